"""The engine against per-request reference generation: greedy outputs equal token for token
with chunked prefill on and off, prefix caching on and off, and a KV pool small enough to
force preemptions; no KV block outlives a run. Also the race that chunked prefill opens in
the prefix cache (a block must not be found before its K/V are written)."""

import random

import pytest
import torch

import minillm
from minillm.data import shipped_heldout_documents
from minillm.engine import LLM, EngineConfig, LLMEngine, SamplingParams


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops run faster on one thread, and a shared 2-core machine stays usable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return minillm.load_model("minillm-tiny-draft")  # 3 layers: a fast reference


@pytest.fixture(scope="module")
def tokens():
    tok = minillm.load_tokenizer("minillm-tiny")
    text = "\n".join(shipped_heldout_documents()[:40])
    return tok.encode(text)


def mixed_requests(tokens, n=120, seed=0):
    """n greedy requests: prompts of 1-150 tokens cut from real code (a third of them
    sharing one of three prefixes), outputs of 1-40 tokens, some with stop token ids."""
    rng = random.Random(seed)
    prefixes = [tokens[i * 500 : i * 500 + rng.randint(20, 90)] for i in range(3)]
    out = []
    for _ in range(n):
        start = rng.randrange(len(tokens) - 200)
        prompt = tokens[start : start + rng.randint(1, 150)]
        if rng.random() < 0.35:
            prompt = rng.choice(prefixes) + prompt[: rng.randint(0, 30)]
        stop = [rng.randrange(4096)] if rng.random() < 0.2 else []
        params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 40), stop_token_ids=stop)
        out.append((prompt, params))
    return out


@pytest.fixture(scope="module")
def workload(model, tokens):
    """The requests and each one's reference completion (`generate_cached`, alone)."""
    reqs = mixed_requests(tokens)
    refs = [minillm.generate_cached(model, p, params)[0] for p, params in reqs]
    return reqs, refs


def run_engine(model, reqs, **config):
    engine = LLMEngine(model, config=EngineConfig(**config))
    llm = LLM.from_engine(engine)
    outs = llm.generate([p for p, _ in reqs], [params for _, params in reqs])
    return engine, outs


def assert_no_leak(engine):
    bm = engine.bm
    assert not bm.seqs and bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    assert sum(b.ref_count for b in bm.blocks) == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting


CONFIGS = {
    "chunked+prefix": dict(enable_chunked_prefill=True, enable_prefix_caching=True,
                           max_num_batched_tokens=64),
    "whole prompts, no prefix cache": dict(enable_chunked_prefill=False,
                                           enable_prefix_caching=False),
    "chunked+prefix, preempting": dict(enable_chunked_prefill=True, enable_prefix_caching=True,
                                       max_num_batched_tokens=48, num_kv_blocks=26),
    "whole prompts+prefix, preempting": dict(enable_chunked_prefill=False,
                                             enable_prefix_caching=True, num_kv_blocks=26),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_outputs_equal_the_reference(model, workload, name):
    reqs, refs = workload
    engine, outs = run_engine(
        model, reqs, block_size=8, max_num_seqs=24, max_model_len=200, **CONFIGS[name]
    )
    assert len(outs) == len(reqs)
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        got = out.outputs[0]
        assert got.token_ids == ref.token_ids, f"request {i}: tokens differ from the reference"
        assert got.finish_reason == ref.finish_reason, f"request {i}"
        assert got.stop_reason == ref.stop_reason, f"request {i}"
    assert_no_leak(engine)
    s = engine.scheduler
    if "preempting" in name:
        assert s.num_preemptions > 0, "the small pool was meant to force preemptions"
    if "chunked" in name:
        assert s.num_partial_prefills > 0, "no prompt was split into chunks"
    if "+prefix" in name:
        assert engine.bm.prefix_hits > 0, "the shared prefixes were never hit"


def test_prefix_hits_wait_for_the_chunk_that_computes_them(model, tokens):
    """B shares A's first 150 tokens and arrives while A is still prefilling in chunks of 32:
    B may only hit the blocks A has computed (registered per chunk), and must equal the
    reference. Registering all of A's blocks at its admission would hand B unwritten K/V."""
    a = tokens[1000:1200]
    b = a[:150] + tokens[3000:3010]
    params = SamplingParams(temperature=0, max_tokens=12)
    engine = LLMEngine(model, config=EngineConfig(block_size=8, max_num_batched_tokens=32))
    ra = engine.add_request(a, params)
    engine.step()  # A computes its first chunk only
    computed_by_a = engine._requests[ra][0][0].num_computed_tokens
    assert computed_by_a == 32
    # The cache holds A's computed blocks, not the 18 full blocks B's prefix shares with A.
    assert engine.bm.num_prefix_hit_tokens(b) == 32
    rb = engine.add_request(b, params)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o
    for rid, prompt in ((ra, a), (rb, b)):
        ref = minillm.generate_cached(model, prompt, params)[0].token_ids
        assert outs[rid].outputs[0].token_ids == ref
    assert outs[rb].metrics.num_cached_tokens == 144  # once A is done: 18 blocks of 8
    assert_no_leak(engine)


def test_n_completions_and_sampling_match_generate_cached(model, tokens):
    """Seeded sampling draws from each completion's own generator: the engine gives
    generate_cached's samples, whatever else shares the batch."""
    prompt = tokens[:30]
    params = SamplingParams(n=3, temperature=0.9, top_k=50, top_p=0.9, seed=7, max_tokens=15,
                            repetition_penalty=1.2, frequency_penalty=0.3)  # fmt: skip
    engine = LLMEngine(model, config=EngineConfig(block_size=8))
    llm = LLM.from_engine(engine)
    noise = [(tokens[100 + i : 120 + 3 * i], SamplingParams(temperature=1.0, max_tokens=9))
             for i in range(5)]  # fmt: skip
    outs = llm.generate([prompt] + [p for p, _ in noise], [params] + [q for _, q in noise])
    ref = minillm.generate_cached(model, prompt, params)
    assert [c.token_ids for c in outs[0].outputs] == [c.token_ids for c in ref]
    assert_no_leak(engine)


def test_metrics_and_text(model):
    llm = LLM(model, minillm.load_tokenizer("minillm-tiny-draft"), block_size=8)
    (out,) = llm.generate("def add(a, b):", SamplingParams(temperature=0, max_tokens=10))
    c = out.outputs[0]
    assert c.text == llm.tokenizer.decode(c.token_ids)
    m = out.metrics
    assert len(m.token_times) == len(c.token_ids) == 10
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert len(m.time_between_tokens) == 9 and min(m.time_between_tokens) >= 0


def test_stream_yields_the_text_of_generate(model):
    llm = LLM(model, minillm.load_tokenizer("minillm-tiny-draft"), block_size=8)
    params = SamplingParams(temperature=0, max_tokens=40, stop="\n\n")
    (full,) = llm.generate("class Stack:", params)
    deltas = list(llm.stream("class Stack:", params))
    assert "".join(d.text for d in deltas) == full.outputs[0].text
    assert [t for d in deltas for t in d.token_ids] == full.outputs[0].token_ids
    assert deltas[-1].finish_reason == full.outputs[0].finish_reason
    assert all(d.finish_reason is None for d in deltas[:-1])


@pytest.mark.parametrize("steps, fused", [(1, False), (5, False), (5, True)])
def test_static_decode_buffers_and_multi_step(model, workload, steps, fused):
    """The CUDA-graph decode path (static buffers, greedy feedback, lookahead blocks) run
    eagerly on the CPU: the same tokens, with S steps per engine step, through
    preemptions; `fused`: the graphs' tail is the Triton kernel (interpreted), as on a GPU."""
    reqs, refs = workload
    config = EngineConfig(block_size=8, max_num_seqs=16, num_kv_blocks=40, max_model_len=200,
                          num_scheduler_steps=steps)  # fmt: skip
    engine = LLMEngine(model, config=config)
    engine.enable_decode_graphs(capture=False)
    engine.runner.graphs.fused_feedback = fused
    llm = LLM.from_engine(engine)
    outs = llm.generate([p for p, _ in reqs[:40]], [q for _, q in reqs[:40]])
    for i, (out, ref) in enumerate(zip(outs, refs[:40], strict=False)):
        assert out.outputs[0].token_ids == ref.token_ids, f"request {i}"
    assert engine.runner.num_graph_steps > 0 and engine.scheduler.num_preemptions > 0
    # Every step with a prompt chunk went through the padded piecewise path.
    assert engine.runner.num_piecewise_steps > 0 and engine.runner.num_eager_steps == 0
    assert (engine.num_multi_steps > 0) == (steps > 1)
    assert_no_leak(engine)
