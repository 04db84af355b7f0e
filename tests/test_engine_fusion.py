"""Fused layers and the CUDA paths of the engine: the fused Triton kernels against their
PyTorch twins (CPU interpreter; bf16 on the GPU), injected models against the originals
(every architecture switch), the engine's Triton attention path through the interpreter,
CUDA graphs against eager steps (GPU), and int8 weights through the quantization API."""

import pytest
import torch
import torch.nn.functional as F
from helpers import ARCHS, make_hf_model

import minillm
from minillm.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from minillm.engine.fusion import FusedDecoderLayer
from minillm.engine.inject import inject_fused_modules
from minillm.layers.norm import rms_norm as rms_norm_ref
from minillm.layers.rotary import apply_rotary

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kernel_cases(device, dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return randn


@pytest.mark.parametrize(
    "device, dtype, tol",
    [
        ("cpu", torch.float32, 2e-6),  # the interpreter computes in fp32: rounding only
        pytest.param("cuda", torch.bfloat16, 1e-2, marks=pytest.mark.gpu),  # one bf16 ulp
    ],
)
def test_fused_kernels_match_their_pytorch_twins(device, dtype, tol):
    from minillm.kernels.fused_layers import rms_norm, rotary_, silu_and_mul

    randn = kernel_cases(device, dtype)
    x, r, w = randn(7, 96), randn(7, 96), 1 + 0.1 * randn(96)  # 96: not a power of 2
    assert torch.allclose(rms_norm(x, w, 1e-5).float(), rms_norm_ref(x, w, 1e-5).float(),
                          atol=tol, rtol=tol)  # fmt: skip
    y, h = rms_norm(x, w, 1e-5, residual=r)
    assert torch.allclose(h.float(), (x + r).float(), atol=tol, rtol=tol)
    assert torch.allclose(y.float(), rms_norm_ref(x + r, w, 1e-5).float(), atol=tol, rtol=tol)
    q, k, angles = randn(5, 6, 32), randn(5, 2, 32), randn(5, 16).float()
    angles = torch.cat((angles, angles), -1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expect_q = apply_rotary(q.transpose(0, 1), cos, sin).transpose(0, 1)
    expect_k = apply_rotary(k.transpose(0, 1), cos, sin).transpose(0, 1)
    rotary_(q, k, cos, sin)
    assert torch.allclose(q.float(), expect_q.float(), atol=tol, rtol=tol)
    assert torch.allclose(k.float(), expect_k.float(), atol=tol, rtol=tol)
    gu = randn(3, 2 * 1100)  # F = 1100 spans two programs of 1024
    expect = F.silu(gu[:, :1100]) * gu[:, 1100:]
    assert torch.allclose(silu_and_mul(gu).float(), expect.float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(randn(2, 5))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("use_triton", [False, True])
def test_injected_model_matches_the_original(tmp_path, arch, use_triton):
    """Every switch (biases, q/k norm, sliding window, GQA) through the fused modules: the
    plain forward, the KV-cache path and the packed paged path."""
    path = tmp_path / arch
    make_hf_model(arch).save_pretrained(path)
    ref = minillm.load_model(path)
    fused = inject_fused_modules(minillm.load_model(path), use_triton=use_triton)
    assert all(isinstance(layer, FusedDecoderLayer) for layer in fused.model.layers)
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(fused(ids), ref(ids), atol=1e-5)
        cache_ref = minillm.cache.StaticKVCache(ref.config, 2, 32)
        cache = minillm.cache.StaticKVCache(ref.config, 2, 32)
        ref(ids[:, :15], None, cache_ref)
        fused(ids[:, :15], None, cache)
        assert torch.allclose(fused(ids[:, 15:], None, cache), ref(ids[:, 15:], None, cache_ref),
                              atol=1e-5)  # fmt: skip
    if use_triton:  # the engine over the fused model, Triton everywhere (interpreter)
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        prompts = [ids[0].tolist(), ids[1, :3].tolist()]
        expect = [minillm.generate_cached(ref, p, params)[0].token_ids for p in prompts]
        for unified in (False, True):  # split kernels; one unified kernel per layer
            config = EngineConfig(block_size=16, max_num_batched_tokens=16,
                                  unified_attention=unified)  # fmt: skip
            engine = LLMEngine(fused, config=config, use_triton=True)
            assert engine.runner.unified_attention == unified
            outs = _run(engine, prompts, params)  # 21 tokens in chunks of 16: a chunked prefill
            assert [o.outputs[0].token_ids for o in outs] == expect, unified
        # The graph paths' static buffers, run eagerly: decode steps, and whole-forward
        # steps for the prompt chunks.
        engine = LLMEngine(fused, config=EngineConfig(block_size=16, max_num_batched_tokens=16),
                           use_triton=True)  # fmt: skip
        engine.enable_decode_graphs(capture=False)
        outs = _run(engine, prompts, params)
        assert [o.outputs[0].token_ids for o in outs] == expect
        assert engine.runner.num_full_steps > 0 and engine.runner.num_graph_steps > 0


def _run(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[i] for i in ids]


def test_engine_with_fused_layers_equals_the_reference():
    llm = LLM("minillm-tiny-draft", fuse=True, block_size=8, max_num_batched_tokens=32)
    model = minillm.load_model("minillm-tiny-draft")
    tok = llm.tokenizer
    prompts = ["def add(a, b):", "import os\nimport sys\n\n\ndef main(argv):\n    ", "x"]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        ref = minillm.generate_cached(model, tok.encode(prompt), params)[0].token_ids
        assert out.outputs[0].token_ids == ref


def test_int8_weights_through_the_quantizer_interface():
    pytest.importorskip("minillm.quant.rtn")
    from minillm.quant import footprint

    llm = LLM("minillm-tiny", quantization="int8", fuse=True, block_size=8)
    fp = footprint(llm.engine.model)
    assert fp.bits_per_linear_weight < 9  # int8 codes plus per-channel scales
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    (out,) = llm.generate("def add(a, b):", params)
    prompt = llm.tokenizer.encode("def add(a, b):")
    ref = minillm.generate_cached(minillm.load_model("minillm-tiny"), prompt, params)[0].token_ids
    agree = sum(a == b for a, b in zip(out.outputs[0].token_ids, ref, strict=True))
    assert agree >= 8  # int8 per channel barely moves a trained model's greedy choices


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True])
def test_cuda_graphs_replay_the_eager_steps(fuse):
    """The same greedy tokens from CUDA-graph decode steps as from eager ones (fp32 on the
    GPU: the Triton kernels in full precision), and from the reference loop."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["def add(a, b):", "class Stack:", "import os\n", "for i in range(10):"] * 3
    outs = {}
    # (True, 4): multi-step decoding; unified: one attention kernel for steps with prompts;
    # full: steps with prompts as whole-forward graphs (0: the piecewise graphs)
    for graphs, steps, unified, full in ((True, 1, False, 2048), (False, 1, False, 2048),
                                         (True, 4, False, 2048), (True, 1, True, 0),
                                         (True, 1, False, 0)):  # fmt: skip
        llm = LLM("minillm-tiny", device="cuda", dtype=torch.float32, fuse=fuse,
                  cuda_graphs=graphs, max_num_seqs=8, num_scheduler_steps=steps,
                  unified_attention=unified, max_num_batched_tokens=16,
                  full_graph_max_tokens=full)  # fmt: skip
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        runner = llm.engine.runner
        if not full:
            assert got == outs[True, 1]
            assert runner.num_piecewise_steps > 0 and runner.num_full_steps == 0
            continue
        outs[graphs, steps] = got
        assert (runner.num_graph_steps > 0) == graphs
        if graphs:  # the graphs' tail is the Triton kernel (it did not fall back)
            assert runner.graphs.fused_feedback
        assert (runner.num_full_steps > 0) == graphs  # the prefill steps
        assert runner.num_piecewise_steps == 0
        assert (runner.num_eager_steps == 0) == graphs
        assert (llm.engine.num_multi_steps > 0) == (steps > 1)
    assert outs[True, 1] == outs[False, 1] == outs[True, 4]
    model = minillm.load_model("minillm-tiny", device="cuda")
    ref = minillm.generate_cached(model, llm.tokenizer.encode(prompts[0]), params)[0].token_ids
    assert outs[True, 1][0] == ref


@pytest.mark.gpu
def test_speculative_greedy_on_the_gpu_equals_the_target():
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = ["def add(a, b):", "class Stack:", "import os\n"]
    plain = LLM("minillm-tiny", device="cuda", dtype=torch.float32)
    spec = LLM("minillm-tiny", device="cuda", dtype=torch.float32, fuse=True,
               draft_model="minillm-tiny-draft", num_speculative_tokens=4)  # fmt: skip
    a = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in spec.generate(prompts, params)]
    assert a == b and spec.engine.spec.num_accepted > 0
    assert spec.engine.runner.num_graph_steps > 0
    assert spec.engine.spec.num_device_rounds > 0  # one wait per round
    assert all(r.graphs.fused_feedback for r in spec.engine.runners)
    spec.engine.spec.device_rounds = False  # the round that waits twice: the same tokens
    rounds = spec.engine.spec.num_device_rounds
    c = [o.outputs[0].token_ids for o in spec.generate(prompts, params)]
    assert c == a and spec.engine.spec.num_device_rounds == rounds


@pytest.mark.parametrize("window", [None, 5])
def test_decode_through_sdpa_matches_the_paged_reference(window):
    from minillm.cache.paged import paged_attention_ref
    from minillm.layers.attention_metadata import paged_decode_sdpa

    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 12, 4, 2, 16, generator=g, dtype=torch.float64)
    q = torch.randn(3, 6, 16, generator=g, dtype=torch.float64)
    tables = torch.tensor([[3, 1, 7], [0, 5, 0], [11, 2, 9]], dtype=torch.int32)
    lens = torch.tensor([9, 3, 12], dtype=torch.int32)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, lens, window)
    got = paged_decode_sdpa(q, k_cache, v_cache, tables, lens, window)
    assert torch.allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_piecewise_steps_match_the_eager_forward(device):
    """A step of prompt chunks and decodes through the piecewise path (captured on CUDA,
    run eagerly over the same padded buffers on a CPU) gives the eager forward's logits,
    for token counts on and between the captured sizes."""
    from minillm.engine.model_runner import BatchRow

    model = minillm.load_model("minillm-tiny", device=device, dtype=torch.float32)
    config = EngineConfig(block_size=8, max_num_seqs=4, max_model_len=256,
                          max_num_batched_tokens=160, cuda_graphs=False)  # fmt: skip
    engine = LLMEngine(model, config=config)
    runner = engine.runner
    g = torch.Generator().manual_seed(0)
    blocks = list(range(engine.bm.num_blocks))
    first = 20  # a prompt's first chunk; then steps of m tokens: two decodes, a chunk
    for m in (15, 16, 40, 160):  # 15: padded to 16; 40: to 48; 160: the largest size
        ids = torch.randint(0, model.config.vocab_size, (first + m,), generator=g).tolist()
        table = blocks[: -(-(first + m) // 8)]
        runner.piecewise = None
        runner.execute([BatchRow(ids[:first], 0, table_slots(table, 0, first), table)])
        decodes = [
            BatchRow([ids[first + i]], first - 1 - i, table_slots(table, first - 1 - i, 1), table)
            for i in range(2)
        ]  # (positions first - 1 and first - 2 rewritten: the same in both runs)
        chunk = BatchRow(ids[first + 2 :], first, table_slots(table, first, m - 2), table,
                         num_logits=m - 2)  # fmt: skip
        rows = [*decodes, chunk]
        eager = runner.execute(rows, num_decodes=2)
        runner.capture_piecewise_graphs(160, capture=device == "cuda")
        piecewise = runner.execute(rows, num_decodes=2)
        assert runner.num_piecewise_steps > 0 and eager.shape == (m, model.config.vocab_size)
        # Only the matmul shapes differ (padded rows): fp32 rounding.
        err = (piecewise - eager).abs().max()
        assert torch.allclose(piecewise, eager, atol=1e-4, rtol=1e-4), (m, err)


def table_slots(table, start, n, block_size=8):
    return [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_full_graph_steps_match_the_eager_forward(device):
    """A step of prompt chunks and decodes through one whole-forward graph (captured on
    CUDA; on a CPU the same static buffers run eagerly, Triton interpreted) gives the eager
    forward's logits and K/V; padding rows and unused programs write nothing."""
    pytest.importorskip("triton")
    from minillm.engine.model_runner import BatchRow

    model = minillm.load_model("minillm-tiny", device=device, dtype=torch.float32)
    config = EngineConfig(block_size=8, max_num_seqs=4, max_model_len=256,
                          max_num_batched_tokens=160, cuda_graphs=False)  # fmt: skip
    engine = LLMEngine(model, config=config, use_triton=True)
    runner = engine.runner
    pool = runner.kv_cache.k_cache  # (layers, blocks, block_size, Hkv, D)
    g = torch.Generator().manual_seed(0)
    blocks = list(range(1, engine.bm.num_blocks))  # block 0 stays unused: it must stay 0
    first = 20
    for m in (15, 40, 160):  # padded to 16 and 48; 160: the largest size
        ids = torch.randint(0, model.config.vocab_size, (first + m,), generator=g).tolist()
        table = blocks[: -(-(first + m) // 8)]
        runner.full = None
        runner.kv_cache.k_cache.zero_()
        runner.execute([BatchRow(ids[:first], 0, table_slots(table, 0, first), table)])
        decodes = [
            BatchRow([ids[first + i]], first - 1 - i, table_slots(table, first - 1 - i, 1), table)
            for i in range(2)
        ]
        chunk = BatchRow(ids[first + 2 :], first, table_slots(table, first, m - 2), table,
                         num_logits=m - 2)  # fmt: skip
        rows = [*decodes, chunk]
        eager = runner.execute(rows, num_decodes=2)
        eager_pool = pool.clone()
        runner.capture_full_graphs(160, max_seqs=4, max_blocks=32, capture=device == "cuda")
        full = runner.execute(rows, num_decodes=2)
        assert runner.num_full_steps > 0 and full.shape == eager.shape
        err = (full - eager).abs().max()
        assert torch.allclose(full, eager, atol=1e-4, rtol=1e-4), (m, err)
        assert torch.allclose(pool, eager_pool, atol=1e-5) and not pool[:, 0].any()


def rope_cache_case(N, H, Hkv, D, num_blocks, page, dtype, device, seed=0):
    """q, k, v (N, H|Hkv, D) as views of one qkv_proj output (the engine's strides),
    cos/sin (N, D), a pool full of garbage, and shuffled slots with some -1 (padding)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(N, (H + 2 * Hkv) * D, generator=g).to(device, dtype)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(N, H, D), k.view(N, Hkv, D), v.view(N, Hkv, D)
    angles = 3 * torch.randn(N, D // 2, generator=g)
    angles = torch.cat((angles, angles), -1)
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    k_cache, v_cache = torch.randn(2, num_blocks, page, Hkv, D, generator=g).to(device, dtype)
    slots = torch.randperm(num_blocks * page, generator=g)[:N]
    slots[torch.randperm(N, generator=g)[: max(1, N // 5)]] = -1
    return q, k, v, cos, sin, k_cache, v_cache, slots.to(device)


@pytest.mark.parametrize(
    "device, dtype, N, H, Hkv, D, num_blocks, page",
    [
        ("cpu", torch.float32, 7, 6, 2, 24, 3, 5),  # D / 2 = 12 and 6 heads: masked tiles
        ("cpu", torch.float16, 11, 5, 5, 16, 4, 4),  # no GQA
        ("cpu", torch.float16, 4, 8, 1, 40, 2, 3),  # MQA
        pytest.param("cuda", torch.bfloat16, 256, 32, 8, 128, 64, 16, marks=pytest.mark.gpu),
    ],
)
def test_rotary_and_cache_equals_rotary_then_reshape_and_cache(
    device, dtype, N, H, Hkv, D, num_blocks, page
):
    """One kernel for RoPE on q (in place) and k, and the K/V write: the same bits as the
    two kernels it replaces; padding slots (-1) write nothing; k itself is not touched."""
    from minillm.kernels.fused_layers import rotary_
    from minillm.kernels.reshape_and_cache import reshape_and_cache, rotary_and_cache

    q, k, v, cos, sin, k_cache, v_cache, slots = rope_cache_case(
        N, H, Hkv, D, num_blocks, page, dtype, device
    )
    q_ref, k_ref, kc_ref, vc_ref = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    rotary_(q_ref, k_ref, cos, sin)
    reshape_and_cache(k_ref, v, kc_ref, vc_ref, slots)
    k_before = k.clone()
    rotary_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert torch.equal(q, q_ref), "q is not rotated as rotary_ rotates it"
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref), "the pool differs"
    assert torch.equal(k, k_before), "k must stay unrotated (its rotation goes to the pool)"
    expect = apply_rotary(k.transpose(0, 1), cos, sin).transpose(0, 1)
    kept = slots >= 0
    written = k_cache.view(-1, Hkv, D)[slots[kept]]
    assert torch.allclose(written.float(), expect[kept].float(), atol=1e-2, rtol=1e-2)


def test_rotary_and_cache_rejects_bad_input():
    from minillm.kernels.reshape_and_cache import rotary_and_cache

    q, k, v, cos, sin, kc, vc, slots = rope_cache_case(5, 4, 2, 8, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="q must be"):
        rotary_and_cache(q[:, :, :4], k, v, cos, sin, kc, vc, slots)
    with pytest.raises(ValueError, match="cos and sin"):
        rotary_and_cache(q, k, v, cos[:4], sin[:4], kc, vc, slots)
    with pytest.raises(ValueError, match="one float dtype"):
        rotary_and_cache(q.half(), k, v, cos, sin, kc, vc, slots)
    with pytest.raises(ValueError, match="one float dtype"):
        rotary_and_cache(q, k, v, cos, sin, kc, vc.half(), slots)
    with pytest.raises(ValueError, match="pool"):
        rotary_and_cache(q, k, v, cos, sin, kc[..., :1, :], vc[..., :1, :], slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary_and_cache(q, k, v, cos, sin, kc, vc, slots.float())
    with pytest.raises(ValueError, match="outside the pool"):
        rotary_and_cache(q, k, v, cos, sin, kc, vc, slots + 8)
    q7, k7, v7, cos7, sin7, kc7, vc7, s7 = rope_cache_case(3, 2, 1, 7, 2, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="even head dim"):
        rotary_and_cache(q7, k7, v7, cos7, sin7, kc7, vc7, s7)


class _OldOrder:
    """The metadata without `stores_kv_at_slots`: the layers run RoPE, then `attend`
    stores K/V (the order before the fused kernel)."""

    def __init__(self, md):
        self.md, self.logits_indices = md, md.logits_indices

    def attend(self, *args, **kwargs):
        return self.md.attend(*args, **kwargs)


def _old_order_logits(model, ids, positions, cache=None, md=None):
    """The fused model as it ran before the residual add moved into the next norm: every
    layer returns h + mlp output, the final norm sees the sum."""
    from minillm.layers.rotary import rope_cos_sin, rope_inv_freq

    x = model.model.embed_tokens(ids)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(model.config, x.device), x.dtype)
    for layer in model.model.layers:
        x = layer(x, cos, sin, model.attn_backend, cache, md)
    return model.lm_head(model.model.norm(x))


@pytest.mark.parametrize(
    "use_triton, dtype, device",
    [
        (False, torch.bfloat16, "cpu"),
        # fp16: the interpreter casts fp32 -> bf16 by truncation (the GPU and torch round
        # to nearest even), so its bf16 kernels cannot give torch's bits
        (True, torch.float16, "cpu"),
        pytest.param(True, torch.bfloat16, "cuda", marks=pytest.mark.gpu),
    ],
)
def test_carried_residual_gives_the_same_bits(tmp_path, use_triton, dtype, device):
    """16-bit activations, where every add rounds: the residual add carried into the next
    norm (and the final one) and RoPE fused into the K/V write give the bits of the
    previous order, on the dense path and the packed paged path (a prefill, then a
    decode); and stay close to the unfused model."""
    from minillm.cache.paged import PagedKVCache
    from minillm.layers.attention_metadata import AttentionMetadata

    make_hf_model("qwen3").save_pretrained(tmp_path)  # q/k norm, GQA, head_dim 32
    ref = minillm.load_model(tmp_path, dtype=dtype, device=device)
    fused = minillm.load_model(tmp_path, dtype=dtype, device=device)
    fused = inject_fused_modules(fused, use_triton=use_triton)
    T = 11
    ids = torch.randint(0, 128, (1, T + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    with torch.no_grad():
        dense = fused(ids)
        old = _old_order_logits(fused, ids, torch.arange(T + 1, device=device))
        assert torch.equal(dense, old)
        assert torch.allclose(dense.float(), ref(ids).float(), atol=5e-2)
        pools = [PagedKVCache.for_model(fused.config, 4, 8, dtype=dtype, device=device)
                 for _ in range(3)]  # fmt: skip

        def metadata(pool, step):
            def t(values, dt=torch.int64):
                return torch.tensor(values, dtype=dt, device=device)

            kw = dict(kv_cache=pool, use_triton=device == "cuda")
            if step == 0:  # a prefill of T tokens in slots 0 .. T - 1
                cu = t([0, T], torch.int32)
                return AttentionMetadata(
                    slot_mapping=t(range(T)), cu_seqlens_q=cu, cu_seqlens_k=cu,
                    kv_slots=t(range(T)), query_lens=[T], key_lens=[T], **kw,
                )  # fmt: skip
            return AttentionMetadata(
                slot_mapping=t([T]), num_decodes=1, block_tables=t([[0, 1]], torch.int32),
                context_lens=t([T + 1], torch.int32), max_decode_context=T + 1, **kw,
            )  # fmt: skip

        steps = [(ids[0, :T], torch.arange(T, device=device)),
                 (ids[0, T:], torch.tensor([T], device=device))]  # fmt: skip
        for step, (tok, pos) in enumerate(steps):
            new = fused(tok, pos, attn_metadata=metadata(pools[0], step))
            old = _old_order_logits(fused, tok, pos, None, _OldOrder(metadata(pools[1], step)))
            assert torch.equal(new, old), step
            assert torch.equal(pools[0].k_cache, pools[1].k_cache), step
            assert torch.equal(pools[0].v_cache, pools[1].v_cache), step
            unfused = ref(tok, pos, attn_metadata=metadata(pools[2], step))
            assert torch.allclose(new.float(), unfused.float(), atol=5e-2), step
        assert torch.allclose(new.float(), dense[0, T:].float(), atol=5e-2)
        hidden = fused.packed_hidden_states(tok, pos, metadata(pools[0], 1))
        assert torch.equal(fused.compute_logits(hidden), new)  # the graphs' split forward
