"""The bundled models: they load offline, ship within budget, and are as good as their
cards say (held-out perplexity recomputed here and compared with the stored value)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import minillm
from minillm.bundled import BUNDLED_MODELS, MODELS_DIR
from minillm.data import SHIPPED_HELDOUT, shipped_heldout_documents, text_sha256, tokenize_documents
from minillm.evaluate import perplexity


def card(name):
    return json.loads((minillm.bundled_model_path(name) / "card.json").read_text())


def test_size_budget():
    """Both models with their tokenizers fit in 16 MB."""
    files = [f for f in MODELS_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 16 * 2**20


def test_loads_offline_in_a_fresh_process():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = (
        "import minillm, transformers;"
        "m = minillm.load_model('minillm-tiny');"
        "t = minillm.load_tokenizer('minillm-tiny');"
        "transformers.AutoModelForCausalLM.from_pretrained(minillm.bundled_model_path());"
        "print(t.decode(minillm.generate(m, t.encode('import '), 5, stop_token_ids=[])))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


@pytest.fixture(scope="module")
def heldout_tokens():
    return tokenize_documents(minillm.load_tokenizer(), shipped_heldout_documents())


def test_shipped_heldout_is_what_the_cards_describe(heldout_tokens):
    for name in BUNDLED_MODELS:
        c = card(name)
        assert text_sha256(SHIPPED_HELDOUT) == c["heldout_sha256"]
        assert len(heldout_tokens) == c["heldout_tokens"]


@pytest.mark.parametrize("name", list(BUNDLED_MODELS))
def test_heldout_perplexity_matches_the_card(name, heldout_tokens):
    c = card(name)
    model = minillm.load_model(name)
    ppl = perplexity(model, heldout_tokens, max_tokens=c["ci_eval_tokens"])
    # fp32 on another machine: the card was computed on the training GPU; 1e-5 relative
    # is ~100x the differences of fp32 kernels between devices.
    assert ppl == pytest.approx(c["ci_heldout_perplexity"], rel=1e-5)
    # "Far below the unigram baseline": at least 20x better, on the same tokens.
    assert ppl * 20 < c["ci_unigram_perplexity"]
    assert c["heldout_perplexity"] * 20 < c["unigram_perplexity"]


def test_unigram_baseline_is_a_true_unigram_number(heldout_tokens):
    """No unigram model can beat the empirical entropy of the evaluated tokens
    (cross-entropy >= entropy), so the card's baseline must lie above exp(entropy)."""
    c = card("minillm-tiny")
    n, T = c["ci_eval_tokens"], c["eval_seq_len"]
    targets = heldout_tokens[: n // T * T].reshape(-1, T)[:, 1:].ravel().astype(np.int64)
    p = np.bincount(targets) / len(targets)
    p = p[p > 0]
    assert np.exp(-(p * np.log(p)).sum()) <= c["ci_unigram_perplexity"]


def test_target_beats_draft():
    assert (
        card("minillm-tiny")["heldout_perplexity"]
        < card("minillm-tiny-draft")["heldout_perplexity"]
    )


@pytest.mark.parametrize("name", list(BUNDLED_MODELS))
def test_card_matches_the_model(name):
    c = card(name)
    model = minillm.load_model(name)
    assert model.num_parameters() == c["parameters"]
    assert model.config.to_hf_dict() == c["config"]
    text = (minillm.bundled_model_path(name) / "README.md").read_text()
    assert f"{c['heldout_perplexity']:.3f}" in text and f"{c['parameters']:,}" in text
