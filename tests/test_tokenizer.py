"""Tokenizers: the bundled one agrees with transformers; streaming decode is exact."""

import random

import pytest

import minillm
from minillm.tokenizer import Tokenizer

TEXTS = [
    "def f(x):\n    return x * 2\n",
    "héllo wörld — ünïcödé ✓ 日本語 🙂",
    "    \t  indented\n\n\nblank lines",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return minillm.load_tokenizer("minillm-tiny")


def test_special_tokens(tok):
    assert tok.vocab_size == 4096
    assert tok.bos_token_id == tok.eos_token_id == 0
    assert tok.encode("x")[0] == 0  # every text starts with <|endoftext|>
    assert tok.encode("x", add_special_tokens=False)[0] != 0


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_transformers_agree(tok, text):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(minillm.bundled_model_path("minillm-tiny"))
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"]
    assert tok.decode(ids) == text == hf.decode(ids, skip_special_tokens=True)


def test_draft_shares_the_tokenizer():
    a = minillm.bundled_model_path("minillm-tiny") / "tokenizer.json"
    b = minillm.bundled_model_path("minillm-tiny-draft") / "tokenizer.json"
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("seed", range(5))
def test_stream_decoder_equals_decode(tok, seed):
    """Random token streams (which split multi-byte characters anywhere) decode to the same
    text piece by piece as at once, and no piece carries a replacement character that the
    full text does not have."""
    rng = random.Random(seed)
    ids = tok.encode(TEXTS[1] * 2) + [rng.randrange(tok.vocab_size) for _ in range(200)]
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)


def test_stream_decoder_waits_for_whole_characters(tok):
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🙂"


def test_encode_type_error(tok):
    with pytest.raises(TypeError, match="str"):
        tok.encode(["a list"])


def test_save_copies_files(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer(tmp_path)
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_missing_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="no usable tokenizer"):
        Tokenizer(tmp_path)
