"""Speculative decoding: greedy output equals the target's greedy output token for token (in
the batched engine, with chunked prefill, prefix caching and preemption); sampled output
follows the target's distribution exactly (chi-square tests on small vocabularies, for the
acceptance rule alone and for the whole engine), and the tests can tell a wrong rule."""

import random

import pytest
import torch

import minillm
from minillm.data import shipped_heldout_documents
from minillm.engine import EngineConfig, LLMEngine, SamplingParams
from minillm.engine.sampler import token_probs
from minillm.engine.sequence import Sequence
from minillm.engine.speculative import (
    expected_tokens_per_round,
    greedy_verify,
    rejection_sample,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square test of `counts` against `probs` (cells with
    probability 0 must have no counts; they carry no degree of freedom)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    assert counts[probs == 0].sum() == 0, "a token the target never samples was emitted"
    keep = probs > 0
    n = counts.sum()
    expected = n * probs[keep]
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2))


def run(engine, prompts, params):
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def test_acceptance_rule_samples_the_target_distribution():
    """Fixed p (k + 1 rows) and q (k rows) over 5 tokens: the first emitted token follows
    p_1, and the second (after an acceptance) p_2. A rule that accepts every draft token
    emits q instead, and the same test rejects it."""
    g = torch.Generator().manual_seed(0)
    V, k, N = 5, 2, 20000
    p = torch.tensor([[0.5, 0.2, 0.1, 0.2, 0.0], [0.1, 0.1, 0.6, 0.1, 0.1], [0.2] * 5])
    q = torch.tensor([[0.2, 0.5, 0.1, 0.1, 0.1], [0.4, 0.1, 0.1, 0.3, 0.1]])
    first, second, naive = torch.zeros(V), torch.zeros(V), torch.zeros(V)
    for _ in range(N):
        drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(k)]
        out = rejection_sample(drafts, q, p, g)
        assert 1 <= len(out) <= k + 1
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
        naive[drafts[0]] += 1
    assert chi2_pvalue(first, p[0]) > 1e-3
    assert chi2_pvalue(second, p[1]) > 1e-3
    assert chi2_pvalue(naive, p[0] + 1e-12) < 1e-6  # accepting blindly is detected


def test_greedy_verify_and_expected_length():
    assert greedy_verify([3, 4, 5], [3, 4, 9, 7]) == [3, 4, 9]
    assert greedy_verify([3, 4], [3, 4, 8]) == [3, 4, 8]  # all accepted: bonus token
    assert greedy_verify([1, 4], [2, 4, 8]) == [2]
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert abs(expected_tokens_per_round(0.8, 4) - 3.3616) < 1e-9
    with pytest.raises(ValueError, match="target_probs"):
        rejection_sample([1, 2], torch.ones(2, 4) / 4, torch.ones(2, 4) / 4)


@pytest.fixture(scope="module")
def pair():
    return minillm.load_model("minillm-tiny"), minillm.load_model("minillm-tiny-draft")


@pytest.mark.parametrize(
    "k, config, graphs",
    [
        (4, dict(), False),
        (3, dict(), True),  # decode steps through the CUDA-graph buffers, run eagerly
        (2, dict(max_num_batched_tokens=40, num_kv_blocks=40, max_model_len=240), False),
        (2, dict(max_num_batched_tokens=40, num_kv_blocks=40, max_model_len=240), "fused"),
    ],
)
def test_greedy_speculative_equals_the_target(pair, k, config, graphs):
    target, draft = pair
    tok = minillm.load_tokenizer("minillm-tiny")
    tokens = tok.encode("\n".join(shipped_heldout_documents()[:20]))
    rng = random.Random(k)
    prompts, params = [], []
    for i in range(24):
        start = rng.randrange(len(tokens) - 150)
        prompts.append(tokens[start : start + rng.randint(1, 120)])
        params.append(
            SamplingParams(temperature=0, max_tokens=rng.randint(1, 40), ignore_eos=bool(i % 2))
        )
    prompts[1] = prompts[0][:100] + prompts[1][:10]  # a shared prefix
    engine = LLMEngine(target, config=EngineConfig(block_size=8, num_speculative_tokens=k,
                                                   max_num_seqs=12, **config),
                       draft_model=draft)  # fmt: skip
    if graphs:
        engine.enable_decode_graphs(capture=False)
        for runner in engine.runners:  # "fused": the graphs' tail as on a GPU (interpreted)
            runner.graphs.fused_feedback = graphs == "fused"
    outs = run(engine, prompts, params)
    for i, (out, prompt, p) in enumerate(zip(outs, prompts, params, strict=True)):
        ref = minillm.generate_cached(target, prompt, p)[0]
        assert out.outputs[0].token_ids == ref.token_ids, f"request {i}"
        assert out.outputs[0].finish_reason == ref.finish_reason
    spec = engine.spec
    assert spec.num_rounds > 0 and 0 < spec.num_accepted < spec.num_drafted
    assert not engine.bm.seqs and engine.bm.num_free_blocks == engine.bm.num_blocks
    assert (engine.runner.num_graph_steps > 0) == bool(graphs)
    assert (spec.num_device_rounds > 0) == bool(graphs)  # the one-synchronization round
    if "num_kv_blocks" in config:
        assert engine.scheduler.num_preemptions > 0
        assert engine.scheduler.num_partial_prefills > 0


def small_vocab_pair():
    """A target and a different draft over 6 tokens: exact distributions are enumerable."""
    config = minillm.ModelConfig(vocab_size=6, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(1)
    target = minillm.CausalLM(config).eval()
    draft = minillm.CausalLM(config.replace(num_hidden_layers=1)).eval()
    for m, scale in ((target, 60.0), (draft, 40.0)):  # sharpen the random models' logits
        with torch.no_grad():
            m.lm_head.weight.mul_(scale)
    return target, draft


@pytest.mark.parametrize("extra", [dict(), dict(top_k=4, temperature=0.8)])
def test_speculative_sampling_follows_the_target_distribution(extra):
    """3000 requests of 3 new tokens each, k = 2: the joint distribution of the first two
    tokens (36 cells) and of the third given the first two matches the target's exact one."""
    target, draft = small_vocab_pair()
    prompt, V, N = [1, 4, 2], 6, 3000
    params = [SamplingParams(max_tokens=3, seed=s, **extra) for s in range(N)]
    engine = LLMEngine(target, config=EngineConfig(block_size=4, num_speculative_tokens=2,
                                                   max_num_seqs=256,
                                                   enable_prefix_caching=False),
                       draft_model=draft)  # fmt: skip
    outs = run(engine, [prompt] * N, params)
    assert engine.spec.num_accepted > 0 and engine.spec.num_accepted < engine.spec.num_drafted

    def dist(model, context):
        """The distribution the request samples its next token from, after `context`."""
        logits = model(torch.tensor([context]))[0, -1:]
        return token_probs(logits, [Sequence("exact", context, params[0])])[0].double()

    with torch.no_grad():
        p1 = dist(target, prompt)
        joint = torch.stack([p1[a] * dist(target, [*prompt, a]) for a in range(V)])  # (V, V)
        q1 = dist(draft, prompt)
    counts = torch.zeros(V, V)
    for o in outs:
        a, b, _ = o.outputs[0].token_ids
        counts[a, b] += 1
    assert chi2_pvalue(counts, joint) > 1e-3
    assert chi2_pvalue(counts.sum(1), q1) < 1e-6  # the draft's distribution is told apart
