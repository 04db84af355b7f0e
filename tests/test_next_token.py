"""minillm.next_token: the next-token distribution of the tour and the warm-up exercise."""

import math

import pytest
import torch

import minillm
from minillm.next_token import next_token_probs, plot_next_tokens, top_next_tokens


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return minillm.load_model("minillm-tiny"), minillm.load_tokenizer("minillm-tiny")


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_probabilities_are_the_softmax_of_the_last_logits(model_and_tokenizer, temperature):
    model, tok = model_and_tokenizer
    ids = tok.encode("def add(a, b):")
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1].double()  # (V,)
    expected = torch.softmax(logits / temperature, dim=-1)  # fp64 reference
    probs = next_token_probs(model, ids, temperature)
    assert probs.shape == (model.config.vocab_size,) and probs.dtype == torch.float32
    # fp32 softmax over 4096 entries vs fp64: a few ulps of the largest probability
    torch.testing.assert_close(probs.double(), expected, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(probs.sum()), 1.0, abs_tol=1e-5)


def test_temperature_zero_is_greedy(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = tok.encode("import")
    greedy = next_token_probs(model, ids, 0)
    assert greedy.sum() == 1 and greedy.max() == 1
    assert int(greedy.argmax()) == minillm.generate(model, ids, 1)[0]


def test_top_candidates_are_sorted_and_decoded(model_and_tokenizer):
    model, tok = model_and_tokenizer
    cands = top_next_tokens(model, tok, "for i in range(", k=7, temperature=0.5)
    assert len(cands) == 7
    probs = [c.probability for c in cands]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert all(c.text == tok.decode([c.token_id], skip_special_tokens=False) for c in cands)
    # the same prompt as token ids gives the same answer; a lower temperature sharpens it
    assert top_next_tokens(model, tok, tok.encode("for i in range("), k=7, temperature=0.5) == cands
    hotter = top_next_tokens(model, tok, "for i in range(", k=1, temperature=2.0)[0]
    assert hotter.token_id == cands[0].token_id and hotter.probability < cands[0].probability


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be >= 0"),
        (dict(temperature="hot"), TypeError, "temperature must be a number"),
        (dict(k=0), ValueError, "k must be an integer >= 1"),
        (dict(k=2.5), ValueError, "k must be an integer >= 1"),
        (dict(prompt=[]), ValueError, "non-empty"),
        (dict(prompt=[0] * 2000), ValueError, "context"),
        (dict(prompt=[10**6]), ValueError, r"token ids must lie in \[0, 4096\)"),
    ],
)
def test_bad_input_is_rejected_clearly(model_and_tokenizer, kwargs, error, match):
    model, tok = model_and_tokenizer
    args = dict(prompt="import", k=5, temperature=1.0) | kwargs
    with pytest.raises(error, match=match):
        top_next_tokens(model, tok, **args)


def test_plot_draws_one_bar_per_candidate(model_and_tokenizer):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, tok = model_and_tokenizer
    cands = top_next_tokens(model, tok, "import", k=4)
    fig = plot_next_tokens(cands, title="after 'import'")
    (ax,) = fig.axes
    assert len(ax.patches) == 4
    assert [t.get_text() for t in ax.get_yticklabels()] == [repr(c.text) for c in cands][::-1]
    plt.close(fig)
