"""The reference generation loop and basic sampling."""

import pytest
import torch

import minillm
from minillm.sampling import sample_next_token, top_k_filter, top_p_filter


@pytest.fixture(scope="module")
def model():
    config = minillm.ModelConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=24,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    return minillm.CausalLM(config).eval()


def test_greedy_is_argmax_of_full_recompute(model):
    prompt = [5, 6, 7]
    out = minillm.generate(model, prompt, 6, stop_token_ids=[])
    ids = list(prompt)
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[3:]


def test_seeded_sampling_is_reproducible(model):
    a = minillm.generate(model, [1, 2], 10, temperature=1.0, seed=3, stop_token_ids=[])
    b = minillm.generate(model, [1, 2], 10, temperature=1.0, seed=3, stop_token_ids=[])
    c = minillm.generate(model, [1, 2], 10, temperature=1.0, seed=4, stop_token_ids=[])
    assert a == b and a != c


def test_stops_after_a_stop_token(model):
    full = minillm.generate(model, [1, 2], 8, stop_token_ids=[])
    stop = full[3]
    cut = full.index(stop) + 1  # the stop token is yielded, then generation ends
    assert minillm.generate(model, [1, 2], 8, stop_token_ids=[stop]) == full[:cut]
    # By default the model's end-of-sequence ids stop generation.
    original = model.config
    model.config = original.replace(eos_token_id=[99, stop])
    try:
        assert minillm.generate(model, [1, 2], 8) == full[:cut]
    finally:
        model.config = original


@pytest.mark.parametrize(
    "prompt, n, message",
    [
        (list(range(25)), 1, "more than the model's context of 24"),
        (list(range(20)), 5, "at most 4"),
        ([], 3, "empty"),
        ([[1, 2]], 3, "1-D"),
    ],
)
def test_prompt_errors(model, prompt, n, message):
    with pytest.raises(ValueError, match=message):
        minillm.generate(model, prompt, n)


def test_exactly_filling_the_context_works(model):
    assert len(minillm.generate(model, list(range(20)), 4, stop_token_ids=[])) == 4


def test_out_of_vocabulary_prompt(model):
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        minillm.generate(model, [1, 99], 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_sampling_argument_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        minillm.generate(model, [1], 2, **kwargs)


def test_max_new_tokens_errors(model):
    with pytest.raises(ValueError, match=">= 0"):
        minillm.generate(model, [1], -1)
    with pytest.raises(TypeError, match="int"):
        minillm.generate(model, [1], 2.0)


def test_top_k_keeps_ties_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([3.0, 1.0, 3.0, 2.0, -1.0])
    assert torch.isfinite(top_k_filter(logits, 1)).tolist() == [True, False, True, False, False]
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # cumulative from the top: 0.5, 0.8, 0.95, 1.0 -> top_p=0.8 keeps two tokens
    assert torch.isfinite(top_p_filter(p, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(p, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(top_p_filter(p, 0.01)).tolist() == [True, False, False, False]


def test_sampling_frequencies_follow_the_filtered_distribution():
    """Top-k=2 then temperature: samples of 2 tokens only, in the softmax ratio."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.expand(20000, 4), temperature=0.5, top_k=2, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    expected = torch.tensor([2.0, 1.0]).div(0.5).softmax(0)
    assert freq[2:].sum() == 0
    # binomial standard error is ~0.002 here; 0.01 is 5 sigma
    torch.testing.assert_close(freq[:2], expected, atol=0.01, rtol=0)
