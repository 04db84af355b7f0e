"""The KV cache: cached decoding equals full recompute, token for token, every architecture."""

import pytest
import torch

import minillm
from minillm.bundled import BUNDLED_MODELS
from minillm.cache import DynamicKVCache, KVCache, StaticKVCache

STEPS = 64
CACHES = {"static": StaticKVCache, "dynamic": DynamicKVCache}


def make_cache(kind: str, model, batch_size: int = 1, max_seq_len: int | None = None) -> KVCache:
    if kind == "dynamic":
        return DynamicKVCache(model.config)
    max_seq_len = max_seq_len or model.config.max_position_embeddings
    return StaticKVCache(model.config, batch_size, max_seq_len, model.dtype, model.device)


def scale_error(ref: torch.Tensor, ours: torch.Tensor) -> float:
    """Max abs difference relative to the logit scale (max |logit| of the reference)."""
    return float((ref - ours).abs().max() / ref.abs().max())


@torch.no_grad()
def cached_logits(model, seq: torch.Tensor, P: int, cache: KVCache) -> torch.Tensor:
    """Prefill seq[:P] into the cache, then decode seq[P:] one token at a time: the
    last-position logits after the prefill and after each decode step but the last."""
    device = model.device
    out = [model(seq[None, :P], torch.arange(P, device=device), cache)[0, -1]]
    for t in range(P, len(seq) - 1):
        token = seq[t].reshape(1, 1)  # (B, T) = (1, 1)
        out.append(model(token, torch.tensor([t], device=device), cache)[0, -1])
    return torch.stack(out)  # (len(seq) - P, V)


@torch.no_grad()
def recompute_logits(model, seq: torch.Tensor, P: int) -> torch.Tensor:
    """The reference: at each step the whole prefix again, keeping the last position."""
    return torch.stack([model(seq[None, :t])[0, -1] for t in range(P, len(seq))])


@torch.no_grad()
def recompute_vs_cache(model, prompt: list[int], steps: int, cache: KVCache):
    """The reference greedy loop (full recompute of the last position's logits, argmax),
    then the cached decode steps fed the same tokens: (tokens, full logits, cached logits)."""
    seq = torch.tensor(prompt, device=model.device)
    full = []
    for _ in range(steps):
        full.append(model(seq[None])[0, -1])  # (V,)
        seq = torch.cat([seq, full[-1].argmax().reshape(1)])
    P = len(prompt)
    return seq[P:].tolist(), torch.stack(full), cached_logits(model, seq, P, cache)


# Tolerance: both paths compute the same fp32 math over the same keys, in different
# groupings (one query against S keys vs S queries at once), so they differ by float32
# rounding: ~1e-7 relative per op, ~1e-6 of the logit scale after the layers.
TOL = 1e-5


@pytest.mark.parametrize("kind", list(CACHES))
def test_cached_decoding_equals_recompute_every_architecture(hf_checkpoint, kind):
    """64 greedy steps (both attention backends with the static cache). The prompt (8)
    + 64 tokens outrun Mistral's window of 16: sliding-window masking meets the cache."""
    arch, _hf, path = hf_checkpoint
    model = minillm.load_model(path)
    prompt = torch.randint(0, 128, (8,), generator=torch.Generator().manual_seed(3)).tolist()
    for backend in ("sdpa", "naive") if kind == "static" else ("sdpa",):
        model.attn_backend = backend
        cache = make_cache(kind, model, max_seq_len=8 + STEPS)
        tokens, full, cached = recompute_vs_cache(model, prompt, STEPS, cache)
        assert scale_error(full, cached) <= TOL, (arch, backend)
        params = minillm.SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
        (out,) = minillm.generate_cached(model, prompt, params)
        assert out.token_ids == tokens, (arch, backend)
        assert cache.seq_len == 8 + STEPS - 1


@pytest.mark.parametrize("name", list(BUNDLED_MODELS))
def test_cached_decoding_equals_recompute_bundled(name):
    model = minillm.load_model(name)
    tok = minillm.load_tokenizer(name)
    prompt = tok.encode("import os\n\n\ndef walk(path):")
    tokens, full, cached = recompute_vs_cache(model, prompt, STEPS, make_cache("static", model))
    assert scale_error(full, cached) <= TOL
    params = minillm.SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    assert minillm.generate_cached(model, prompt, params)[0].token_ids == tokens
    # Sampling with a seed: the same tokens as the reference loop with that seed.
    ref = minillm.generate(model, prompt, 32, temperature=1.0, seed=5, stop_token_ids=[])
    params = minillm.SamplingParams(temperature=1.0, seed=5, max_tokens=32, ignore_eos=True)
    assert minillm.generate_cached(model, prompt, params)[0].token_ids == ref


@pytest.fixture(scope="module")
def small():
    """A small random model with GQA and a sliding window on one of its two layers."""
    config = minillm.ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,
        sliding_window=6,
        layer_types=("sliding_attention", "full_attention"),
        eos_token_id=1,
    )
    torch.manual_seed(0)
    return minillm.CausalLM(config).eval()


@pytest.mark.parametrize("kind", list(CACHES))
@torch.no_grad()
def test_chunked_prefill_and_batches(small, kind):
    """Any split of a batch of sequences into chunks gives the logits of one full forward."""
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(0))
    full = small(ids)
    cache = make_cache(kind, small, batch_size=3, max_seq_len=40)
    pieces, start = [], 0
    for size in (7, 1, 12, 1, 1, 18):
        pieces.append(small(ids[:, start : start + size], None, cache))  # default positions
        start += size
    assert scale_error(full, torch.cat(pieces, dim=1)) <= TOL
    assert cache.seq_len == 40


def test_cache_size_and_crop(small):
    """The static cache reserves its memory at once; the dynamic one grows with the tokens;
    crop forgets positions, and decoding after a crop equals decoding without them."""
    c = small.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # fp32
    static, dynamic = StaticKVCache(c, 2, 30), DynamicKVCache(c)
    assert static.nbytes == per_token * 2 * 30 and dynamic.nbytes == 0
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        for cache in (static, dynamic):
            small(ids, None, cache)
            cache.crop(9)
            again = small(ids[:, 9:], None, cache)
            assert scale_error(small(ids)[:, 9:], again) <= TOL
    assert dynamic.nbytes == per_token * 2 * 12 and static.nbytes == per_token * 2 * 30
    dynamic.reset()
    assert dynamic.seq_len == 0 and dynamic.nbytes == 0


def test_cache_errors(small):
    c = small.config
    with torch.no_grad():
        cache = StaticKVCache(c, 1, 10)
        with pytest.raises(ValueError, match="2 rows"):
            small(torch.zeros(2, 3, dtype=torch.long), None, cache)
        small(torch.zeros(1, 8, dtype=torch.long), None, cache)
        with pytest.raises(ValueError, match="8 of at most 10 positions: 3 more do not fit"):
            small(torch.zeros(1, 3, dtype=torch.long), None, cache)
        with pytest.raises(ValueError, match=r"positions 8\.\.8, got"):
            small(torch.zeros(1, 1, dtype=torch.long), torch.tensor([3]), cache)
        dynamic = DynamicKVCache(c)
        small(torch.zeros(1, 40, dtype=torch.long), None, dynamic)
        with pytest.raises(ValueError, match="after 40 cached ones"):
            small(torch.zeros(1, 9, dtype=torch.long), None, dynamic)
    with pytest.raises(TypeError, match=r"stores torch\.float32"):
        cache.update(0, *(torch.zeros(1, 2, 1, 8, dtype=torch.bfloat16),) * 2)
    with pytest.raises(ValueError, match="max_seq_len 49 exceeds the model's context of 48"):
        StaticKVCache(c, 1, 49)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        StaticKVCache(c, 0, 10)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 0"):
        cache.crop(-1)


def test_generate_cached_stops_and_samples(small):
    greedy = minillm.generate(small, [5, 6], 20, stop_token_ids=[])
    stop = greedy[4]
    params = minillm.SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop])
    (out,) = minillm.generate_cached(small, [5, 6], params)
    assert out.token_ids == greedy[: greedy.index(stop) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    params = minillm.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    assert minillm.generate_cached(small, [5, 6], params)[0].finish_reason == "length"
    sampled = minillm.SamplingParams(n=4, temperature=1.5, seed=0, max_tokens=20, ignore_eos=True)
    outs = minillm.generate_cached(small, [5, 6], sampled)
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in outs}) > 1  # rows draw differently
    assert outs == minillm.generate_cached(small, [5, 6], sampled)  # and reproducibly
    with pytest.raises(ValueError, match="lower max_tokens to at most 46"):
        minillm.generate_cached(small, [5, 6], minillm.SamplingParams(max_tokens=47))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        minillm.generate_cached(small, [5], minillm.SamplingParams(stop="x"))


def test_generate_cached_stop_strings():
    model = minillm.load_model("minillm-tiny-draft")
    tok = minillm.load_tokenizer("minillm-tiny-draft")
    prompt = tok.encode("def add(a, b):")
    params = minillm.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    (free,) = minillm.generate_cached(model, prompt, params, tokenizer=tok)
    stop = free.text.strip()[:3]  # a string the greedy completion is sure to produce
    params.stop = [stop]
    (out,) = minillm.generate_cached(model, prompt, params, tokenizer=tok)
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert stop not in out.text and free.text.startswith(out.text + stop)
    assert out.token_ids == free.token_ids[: len(out.token_ids)]


@pytest.mark.gpu
def test_cached_decoding_on_cuda():
    """On the GPU, fp32: as tight as on the CPU. bf16 (8 significant bits) cannot match
    fp32; its cached logits may be off from the fp32 ones by at most 2x the error of its
    own full recompute (plus one bf16 ulp at the logit scale)."""
    import copy

    config = minillm.ModelConfig.from_name("minillm-tiny")
    torch.manual_seed(0)
    model = minillm.CausalLM(config).to("cuda").eval()
    prompt = list(range(10, 30))
    cache = StaticKVCache(config, 1, 20 + STEPS, torch.float32, "cuda")
    tokens, full32, cached32 = recompute_vs_cache(model, prompt, STEPS, cache)
    assert scale_error(full32, cached32) <= TOL
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    seq = torch.tensor(prompt + tokens, device="cuda")
    full16 = recompute_logits(bf16, seq, 20).float()
    cache = StaticKVCache(config, 1, 20 + STEPS, torch.bfloat16, "cuda")
    cached16 = cached_logits(bf16, seq, 20, cache).float()
    err_full, err_cached = scale_error(full32, full16), scale_error(full32, cached16)
    assert err_cached <= 2 * err_full + 2**-8, (err_cached, err_full)


def test_benchmark_smoke(tmp_path, monkeypatch):
    """`python -m benchmarks.kv_cache --smoke` runs and writes a consistent result."""
    import importlib
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    bench = importlib.import_module("benchmarks.kv_cache")
    data = json.loads(bench.main(["--smoke", "--out", str(tmp_path)]).read_text())
    assert data["end_to_end"]["matching_prefix_tokens"] == data["end_to_end"]["new_tokens"]
    assert data["memory"]["cache_nbytes"] == data["memory"]["calculator_bytes"]
    assert [r["seq_len"] for r in data["rows"]] == [8, 16, 32]
    assert (tmp_path / "kv_cache_cpu_smoke.png").stat().st_size > 0
