"""Sampling: parity with transformers' logits processors, exact distributions, per-row batches."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minillm.sampling import (
    SamplingMetadata,
    SamplingParams,
    apply_penalties,
    min_p_filter,
    process_logits,
    sample,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), r"temperature must be >= 0"),
        (dict(temperature=float("nan")), r"temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), r"top_k must be an integer >= 0"),
        (dict(top_k=1.5), r"top_k must be an integer >= 0"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(n=0), r"n must be an integer >= 1"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be > 0"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(max_tokens=0), r"max_tokens must be >= 1"),
        (dict(seed=1.5), r"seed must be an integer"),
        (dict(stop=["ok", ""]), r"stop must be a non-empty string"),
        (dict(stop_token_ids=[3, -1]), r"stop_token_ids must be integers >= 0"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_type_errors_and_normalization():
    with pytest.raises(TypeError, match="temperature must be a number"):
        SamplingParams(temperature="hot")
    p = SamplingParams(temperature=1, stop="\n\n", stop_token_ids=(5,))
    assert p.temperature == 1.0 and isinstance(p.temperature, float)
    assert p.stop == ["\n\n"] and p.stop_token_ids == [5]
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


# ----------------------------------------------------------------------------- parity with HF


def random_logits(seed: int, B: int = 8, V: int = 64) -> torch.Tensor:
    """Random logits with many ties (rounded to halves), -inf entries, and extreme rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(B, V, generator=g) * 6) / 2  # (B, V), values repeat
    x[torch.rand(B, V, generator=g) < 0.15] = float("-inf")
    x[0, :4] = torch.tensor([1e30, -1e30, 1e30, 3e38])  # overflow-prone magnitudes
    x[1, 5] = 80.0  # one token holds all the mass (others underflow to probability 0)
    x[2] = 0.0  # all tied
    x[3, :-1] = float("-inf")  # a single finite token
    return x


PARITY_SEEDS = range(40)


@pytest.mark.parametrize("seed", PARITY_SEEDS[:10])
def test_temperature_matches_transformers(seed):
    x = random_logits(seed)
    t = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed)) * 2 + 0.05
    from minillm.sampling import apply_temperature

    ours = apply_temperature(x, t)
    for i in range(x.shape[0]):
        ref = TemperatureLogitsWarper(float(t[i]))(None, x[i : i + 1])
        assert torch.equal(ours[i : i + 1], ref), i
        assert torch.equal(apply_temperature(x[i : i + 1], float(t[i])), ref)


def check_filter_rows(ours_batched, ours_scalar, make_ref, x, values):
    """Per-row tensor parameters and one Python value must both give HF's logits exactly."""
    batched = ours_batched(x, values)
    for i in range(x.shape[0]):
        ref = make_ref(values[i].item())(None, x[i : i + 1])
        assert torch.equal(batched[i : i + 1], ref), f"row {i}, value {values[i].item()}"
        assert torch.equal(ours_scalar(x[i : i + 1], values[i].item()), ref), f"row {i}"


@pytest.mark.parametrize("seed", PARITY_SEEDS)
def test_top_k_matches_transformers(seed):
    x = random_logits(seed)
    k = torch.randint(1, 80, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
    k[0] = 1
    check_filter_rows(top_k_filter, top_k_filter, TopKLogitsWarper, x, k)
    assert torch.equal(top_k_filter(x, torch.zeros_like(k)), x)  # 0 disables


@pytest.mark.parametrize("seed", PARITY_SEEDS)
def test_top_p_matches_transformers(seed):
    x = random_logits(seed)
    p = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p[0], p[1] = 0.9, 1e-6
    check_filter_rows(top_p_filter, top_p_filter, TopPLogitsWarper, x, p)
    # p exactly at a boundary: 1 - p equals a cumulative probability (a token is removed
    # when the mass at or below it is <= 1 - p, not only < 1 - p)
    cum = x.sort(dim=-1).values.softmax(dim=-1).cumsum(dim=-1)  # (B, V) ascending
    j = torch.randint(
        0, x.shape[1] - 1, (x.shape[0],), generator=torch.Generator().manual_seed(seed)
    )
    at = 1 - cum.gather(1, j[:, None])[:, 0].double()
    at = torch.where((at > 0) & (at < 1), at, 0.5)  # p = 1 is "off", tested below
    check_filter_rows(top_p_filter, top_p_filter, TopPLogitsWarper, x, at)
    # top_p = 1 is off (transformers does not add its warper then): logits pass unchanged
    assert torch.equal(top_p_filter(x, torch.ones_like(p)), x)


@pytest.mark.parametrize("seed", PARITY_SEEDS)
def test_min_p_matches_transformers(seed):
    x = random_logits(seed)
    m = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed))
    m[0], m[1] = 1.0, 0.0
    check_filter_rows(min_p_filter, min_p_filter, MinPLogitsWarper, x, m)


@pytest.mark.parametrize("seed", PARITY_SEEDS[:10])
def test_repetition_penalty_matches_transformers(seed):
    g = torch.Generator().manual_seed(seed)
    x = random_logits(seed)
    B, V = x.shape
    seen = torch.randint(0, V, (B, 12), generator=g)  # (B, n) ids, repeats included
    pen = torch.rand(B, generator=g) * 2 + 0.1
    mask = torch.zeros(B, V, dtype=torch.bool).scatter_(1, seen, True)
    zeros = torch.zeros(B)
    ours = apply_penalties(x, mask, torch.zeros(B, V, dtype=torch.long), pen, zeros, zeros)
    for i in range(B):
        ref = RepetitionPenaltyLogitsProcessor(float(pen[i]))(seen[i : i + 1], x[i : i + 1])
        assert torch.equal(ours[i : i + 1], ref), i


@pytest.mark.parametrize("seed", PARITY_SEEDS[:20])
def test_the_composed_pipeline_matches_transformers(seed):
    """penalty -> temperature -> top-k -> top-p -> min-p, as transformers orders them,
    with different parameters in every row of one batch."""
    g = torch.Generator().manual_seed(seed)
    x = random_logits(seed, B=6)
    B, V = x.shape
    prompts = [torch.randint(0, V, (int(torch.randint(1, 10, (), generator=g)),), generator=g)]
    prompts += [torch.randint(0, V, (5,), generator=g) for _ in range(B - 1)]
    params = [
        SamplingParams(
            temperature=float(torch.rand((), generator=g)) * 1.5 + 0.1,
            top_k=int(torch.randint(0, 70, (), generator=g)),
            top_p=float(torch.rand((), generator=g)) * 0.99 + 0.01 if i % 3 else 1.0,
            min_p=float(torch.rand((), generator=g)) * 0.5 if i % 2 else 0.0,
            repetition_penalty=float(torch.rand((), generator=g)) + 0.5,
        )
        for i in range(B)
    ]
    md = SamplingMetadata.from_params(params, V, prompt_token_ids=prompts)
    ours = process_logits(x, md)
    for i, p in enumerate(params):
        hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(p.repetition_penalty)])
        hf.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            hf.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1:
            hf.append(TopPLogitsWarper(p.top_p))
        if p.min_p > 0:
            hf.append(MinPLogitsWarper(p.min_p))
        assert torch.equal(ours[i : i + 1], hf(prompts[i][None], x[i : i + 1])), (i, p)


def test_presence_and_frequency_penalties_follow_the_definition():
    """logit - frequency * count - presence * [count > 0], output tokens only (fp64 loop)."""
    g = torch.Generator().manual_seed(0)
    B, V = 3, 10
    x = torch.randn(B, V, generator=g)
    counts = torch.randint(0, 3, (B, V), generator=g)
    presence, frequency = torch.tensor([0.5, -1.0, 0.0]), torch.tensor([0.3, 0.0, 2.0])
    none = torch.zeros(B, V, dtype=torch.bool)
    ours = apply_penalties(x, none, counts, torch.ones(B), presence, frequency)
    for b in range(B):
        for v in range(V):
            c = int(counts[b, v])
            ref = float(x[b, v]) - float(frequency[b]) * c - float(presence[b]) * (c > 0)
            assert math.isclose(float(ours[b, v]), ref, abs_tol=1e-6)


# ----------------------------------------------------------------------------- distributions

LOGITS = torch.tensor([2.0, 1.6, 1.1, 0.35, 0.0, -0.45, -1.2, -3.0])  # no ties, V = 8


def oracle_distribution(logits, params: SamplingParams, seen=(), counts=None) -> list[float]:
    """The filtered distribution from the definitions, in plain Python fp64 (independent of
    the implementation: no sorting tricks, no masks)."""
    V = len(logits)
    z = [float(v) for v in logits]
    for i in range(V):
        c = 0 if counts is None else counts[i]
        if i in seen or c > 0:
            r = params.repetition_penalty
            z[i] = z[i] * r if z[i] < 0 else z[i] / r
        z[i] -= params.frequency_penalty * c + params.presence_penalty * (c > 0)
    z = [v / params.temperature for v in z]
    keep = [True] * V

    def probs():
        m = max(z[i] for i in range(V) if keep[i])
        e = [math.exp(z[i] - m) if keep[i] else 0.0 for i in range(V)]
        return [v / sum(e) for v in e]

    if params.top_k:  # the k largest
        kth = sorted((z[i] for i in range(V) if keep[i]), reverse=True)[params.top_k - 1]
        keep = [keep[i] and z[i] >= kth for i in range(V)]
    if params.top_p < 1:  # a token stays if the tokens more likely than it hold < p
        p = probs()
        keep = [keep[i] and sum(q for q in p if q > p[i]) < params.top_p for i in range(V)]
    if params.min_p > 0:
        p = probs()
        keep = [keep[i] and p[i] >= params.min_p * max(p) for i in range(V)]
    return probs()


def chi_square_pvalue(counts: torch.Tensor, expected_probs: list[float]) -> float:
    """Pearson's chi-square goodness of fit over the tokens of nonzero expected probability;
    p-value = Q(df/2, chi2/2), the regularized upper incomplete gamma function."""
    n = int(counts.sum())
    support = [i for i, p in enumerate(expected_probs) if p > 0]
    chi2 = sum(
        (int(counts[i]) - n * expected_probs[i]) ** 2 / (n * expected_probs[i]) for i in support
    )
    df = len(support) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(chi2 / 2.0)))


SIGNIFICANCE = 1e-3  # reject the implementation if p < 0.001 (one false alarm per 1000 seeds)
N_SAMPLES = 20000
DISTRIBUTION_CASES = {
    "temperature": SamplingParams(temperature=0.7),
    "top_k": SamplingParams(temperature=1.3, top_k=3),
    "top_p": SamplingParams(top_p=0.8),
    "min_p": SamplingParams(temperature=1.5, min_p=0.2),
    "penalties": SamplingParams(
        repetition_penalty=1.8, presence_penalty=0.5, frequency_penalty=0.4
    ),
    "composition": SamplingParams(
        temperature=1.4,
        top_k=6,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.3,
        frequency_penalty=0.2,
    ),
}


@pytest.mark.parametrize("name", list(DISTRIBUTION_CASES))
def test_samples_follow_the_exact_filtered_distribution(name):
    """20000 seeded draws (seed 0) from the batched sampler against the analytic filtered
    distribution: removed tokens never drawn, chi-square p-value >= 0.001."""
    params = DISTRIBUTION_CASES[name]
    seen, counts = (0, 3), [1, 0, 2, 0, 0, 0, 1, 0]
    expected = oracle_distribution(LOGITS, params, seen, counts)
    torch.manual_seed(0)  # unseeded rows draw from the global generator
    outputs = [t for t, c in enumerate(counts) for _ in range(c)]  # tokens with those counts
    md = SamplingMetadata.from_params([params] * N_SAMPLES, 8, [list(seen)] * N_SAMPLES,
                                      output_token_ids=[outputs] * N_SAMPLES)  # fmt: skip
    if not md.no_penalties:
        assert md.output_counts[0].tolist() == counts
    draws = sample(LOGITS.expand(N_SAMPLES, 8), md)
    freq = torch.bincount(draws, minlength=8)
    assert all(freq[i] == 0 for i in range(8) if expected[i] == 0), (freq, expected)
    assert sum(p > 0 for p in expected) >= 2  # the case keeps a real choice
    pvalue = chi_square_pvalue(freq, expected)
    assert pvalue >= SIGNIFICANCE, (name, pvalue, freq.tolist(), expected)


def test_chi_square_detects_a_wrong_distribution():
    """The test above has power: the unfiltered distribution fails it for top-k samples."""
    md = SamplingMetadata.from_params([DISTRIBUTION_CASES["top_p"]] * N_SAMPLES, 8)
    torch.manual_seed(0)
    freq = torch.bincount(sample(LOGITS.expand(N_SAMPLES, 8), md), minlength=8)
    unfiltered = LOGITS.double().softmax(0).tolist()
    assert chi_square_pvalue(freq, unfiltered) < 1e-12


# ----------------------------------------------------------------------------- batches, seeds


def test_rows_are_independent_and_seeds_reproducible():
    """A seeded row draws the same tokens whatever else is in the batch; greedy rows take
    the argmax (after penalties); results do not depend on row order."""
    V = 50
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    a = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    b = SamplingParams(temperature=0.0, repetition_penalty=5.0)
    c = SamplingParams(temperature=2.0, top_k=5)
    prompt = [int(logits[1].argmax())]  # b's argmax is penalized
    alone = []
    for _ in range(20):
        md = SamplingMetadata.from_params([a], V)
        alone.append(int(sample(logits[:1], md)[0]))
    md = SamplingMetadata.from_params([a, b, c, a], V, [[0], prompt, [0], [0]])
    tokens = sample(logits, md)
    first = SamplingMetadata.from_params([a], V)
    assert int(tokens[0]) == int(sample(logits[:1], first)[0])
    assert int(tokens[1]) != prompt[0]
    assert int(tokens[1]) == int(
        apply_penalties(
            logits[1:2],
            torch.nn.functional.one_hot(torch.tensor(prompt), V).bool(),
            torch.zeros(1, V, dtype=torch.long),
            torch.tensor([5.0]),
            torch.zeros(1),
            torch.zeros(1),
        ).argmax()
    )
    assert len(set(alone)) == 1  # a fresh generator with the same seed repeats its draw

    # Over many steps a seeded row's stream is reproducible and differs between seeds.
    def stream(seed, others):
        md = SamplingMetadata.from_params([SamplingParams(seed=seed), *others], V)
        return [int(sample(logits[: 1 + len(others)], md)[0]) for _ in range(30)]

    assert stream(3, []) == stream(3, [c, c]) != stream(4, [])


def test_sample_next_token_keeps_its_contract():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    assert int(sample_next_token(logits)) == 0
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.expand(4000, 4), temperature=1.0, min_p=0.3, generator=g)
    # min-p 0.3 of p = softmax([2, 1, 0, -1]) keeps tokens with p >= 0.3 * p_max: 0 and 1
    assert set(draws.tolist()) == {0, 1}
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\]"):
        sample_next_token(logits, temperature=1.0, min_p=2.0)


def test_per_row_parameters_need_matching_batch():
    with pytest.raises(ValueError, match="per-row parameters"):
        top_k_filter(torch.zeros(3, 5), torch.tensor([1, 2]))


@pytest.mark.gpu
def test_pipeline_on_cuda_matches_cpu():
    """The same filters on CUDA. Logits without ties: the sort order of tied values (which
    top-p depends on) is not the same across devices."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1000, generator=g) * 3
    x[torch.rand(6, 1000, generator=g) < 0.1] = float("-inf")
    params = [
        SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=3),
    ] * 2
    prompts = [[1, 2, 3]] * 6
    cpu = process_logits(x, SamplingMetadata.from_params(params, 1000, prompts))
    md = SamplingMetadata.from_params(params, 1000, prompts, device="cuda")
    gpu = process_logits(x.cuda(), md).cpu()
    assert torch.equal(torch.isinf(cpu), torch.isinf(gpu))
    finite = torch.isfinite(cpu)
    # Kept logits are the inputs divided by the temperature and the penalty: exact in IEEE
    # arithmetic; allow one float32 ulp in case a kernel multiplies by a reciprocal.
    torch.testing.assert_close(gpu[finite], cpu[finite], rtol=1.2e-7, atol=0)
    tokens = sample(x.cuda(), md)
    assert tokens.device.type == "cuda" and tokens.shape == (6,)
    assert int(tokens[1]) == int(x[1].argmax())
    assert bool(torch.isfinite(cpu[0, tokens[0].cpu()]))  # drawn from the kept tokens


def test_metadata_builds_the_history_tables_only_for_penalties():
    """Without penalties the (B, V) tables have no columns and appending is a no-op; with
    one, the prompt mask and the output counts follow the given token ids."""
    plain = SamplingMetadata.from_params([SamplingParams(temperature=0.5)] * 2, 10, [[1], [2]])
    assert plain.no_penalties and plain.prompt_mask.shape == (2, 0)
    plain.append_output(torch.tensor([3, 4]))
    assert plain.output_counts.shape == (2, 0)
    params = [SamplingParams(), SamplingParams(presence_penalty=0.5)]
    md = SamplingMetadata.from_params(params, 10, [[1], [2, 2]], output_token_ids=[[5, 5], []])
    assert md.prompt_mask.nonzero().tolist() == [[0, 1], [1, 2]]
    assert md.output_counts[0, 5] == 2 and md.output_counts.sum() == 2
    md.append_output(torch.tensor([5, 7]))
    assert md.output_counts[0, 5] == 3 and md.output_counts[1, 7] == 1
    with pytest.raises(ValueError, match="1 outputs for 2 rows"):
        SamplingMetadata.from_params(params, 10, output_token_ids=[[5]])


# ---- greedy_argmax: torch's argmax in two passes -------------------------------------------
@pytest.mark.parametrize("V, chunk", [(4096, 1024), (4100, 1024), (1000, 64), (130, 64)])
def test_argmax_two_pass_equals_torch_argmax(V, chunk):
    from minillm.sampling import argmax_two_pass

    g = torch.Generator().manual_seed(V)
    x = torch.randn(5, V, generator=g)
    x[1] = -float("inf")  # every token masked: index 0, like argmax
    x[2, V - 1] = 1e9  # the maximum in the padded last block
    x[3, :] = 0.0  # ties everywhere: the first index
    x[3, [chunk + 3, 2 * chunk - 1]] = 5.0  # tied maxima in different places: the first
    x[4, [7, V - 2]] = 9.0
    for t in (x, x.to(torch.bfloat16), x.half()):
        got = argmax_two_pass(t, chunk)
        assert got.dtype == torch.int64
        assert got.tolist() == t.argmax(-1).tolist()


def test_greedy_argmax_shapes_and_errors():
    from minillm.sampling import argmax_two_pass, greedy_argmax

    x = torch.randn(3, 100)
    assert greedy_argmax(x).tolist() == x.argmax(-1).tolist()  # CPU: torch's argmax
    with pytest.raises(ValueError, match=r"logits must be \(B, V\)"):
        argmax_two_pass(torch.randn(2, 3, 100), 16)


@pytest.mark.gpu
def test_greedy_argmax_on_gpu_equals_torch_argmax():
    from minillm.sampling import greedy_argmax

    for V in (32000, 128256, 151936):
        x = torch.randn(7, V, device="cuda", dtype=torch.bfloat16)
        x[0, [5, V - 5]] = 100.0
        assert greedy_argmax(x).tolist() == x.argmax(-1).tolist()
