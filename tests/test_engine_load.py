"""Load and bad input: 1000 requests with random lengths and parameters all complete, none
lost or duplicated, no KV block leaked; seeded requests sample as they would alone; a
prompt too long for the context fails alone; bad prompts, parameters and settings raise
clear errors."""

import random

import pytest
import torch

import minillm
from minillm.engine import LLM, EngineConfig, LLMEngine, SamplingParams


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return minillm.load_tokenizer("minillm-tiny")


@pytest.fixture(scope="module")
def small_model():
    """A one-layer random model with the bundled tokenizer's vocabulary: fast steps."""
    config = minillm.ModelConfig(vocab_size=4096, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=128,
                                 eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return minillm.CausalLM(config).eval()


def random_params(rng: random.Random) -> SamplingParams:
    greedy = rng.random() < 0.3
    return SamplingParams(
        n=rng.choice([1, 1, 1, 2, 3]),
        temperature=0.0 if greedy else rng.choice([0.5, 1.0, 1.5]),
        top_k=rng.choice([0, 0, 5, 50]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.0, 0.1]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3]),
        presence_penalty=rng.choice([0.0, 0.5]),
        frequency_penalty=rng.choice([0.0, -0.5]),
        seed=rng.choice([None, rng.randrange(1000)]),
        max_tokens=rng.randint(1, 24),
        stop=rng.choice([None, None, "\n", ["):", "e"]]),
        stop_token_ids=rng.choice([None, [rng.randrange(4096)]]),
        ignore_eos=rng.random() < 0.5,
    )


def test_a_thousand_random_requests(small_model, tokenizer):
    rng = random.Random(0)
    reqs = [([rng.randrange(4096) for _ in range(rng.randint(1, 80))], random_params(rng))
            for _ in range(1000)]  # fmt: skip
    llm = LLM(small_model, tokenizer, block_size=8, max_num_seqs=64, num_kv_blocks=96,
              max_num_batched_tokens=256)  # fmt: skip
    outs = llm.generate([p for p, _ in reqs], [q for _, q in reqs])
    assert len(outs) == 1000 and len({o.request_id for o in outs}) == 1000
    for out, (prompt, params) in zip(outs, reqs, strict=True):
        assert out.finished and out.error is None and out.prompt_token_ids == prompt
        assert [c.index for c in out.outputs] == list(range(params.n))
        for c in out.outputs:
            assert 1 <= len(c.token_ids) <= params.max_tokens
            assert len(prompt) + len(c.token_ids) <= 128
            assert c.finish_reason in ("stop", "length")
            assert c.text == tokenizer.decode(c.token_ids) or c.stop_reason in params.stop
    engine = llm.engine
    assert not engine.bm.seqs and engine.bm.num_free_blocks == engine.bm.num_blocks
    assert engine.scheduler.num_preemptions > 0  # the pool was small enough to preempt
    # A seeded request samples from its own generators: alone it gives the same tokens.
    seeded = [i for i, (_, q) in enumerate(reqs) if q.seed is not None and not q.stop][:4]
    assert seeded
    for i in seeded:
        prompt, params = reqs[i]
        alone = minillm.generate_cached(small_model, prompt, params, tokenizer=tokenizer)
        assert [c.token_ids for c in outs[i].outputs] == [c.token_ids for c in alone]


def test_a_prompt_longer_than_the_context_fails_alone(small_model, tokenizer):
    llm = LLM(small_model, tokenizer, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    long = list(range(1, 200))
    outs = llm.generate([[5, 6, 7], long, "def f():"], params)
    assert outs[1].error is not None and "199 tokens" in outs[1].error
    assert "context" in outs[1].error and outs[1].outputs[0].finish_reason == "error"
    for i, prompt in ((0, [5, 6, 7]), (2, tokenizer.encode("def f():"))):
        assert outs[i].error is None
        ref = minillm.generate(small_model, prompt, 5, stop_token_ids=[])
        assert outs[i].outputs[0].token_ids == ref
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "prompts, params, error, match",
    [
        ("", None, ValueError, "empty"),
        ([[]], None, ValueError, "empty"),
        ([], None, ValueError, "no prompts"),
        ([[1, 2, 5000]], None, ValueError, r"\[0, 4096\)"),
        ([3.5], None, TypeError, "a prompt is a str or a list of token ids"),
        ("hi", {"temperature": 0}, TypeError, "SamplingParams"),
        (["a", "b"], [SamplingParams()], ValueError, "1 SamplingParams for 2 prompts"),
    ],
)
def test_bad_input_raises_clear_errors(small_model, tokenizer, prompts, params, error, match):
    llm = LLM(small_model, tokenizer, block_size=8)
    with pytest.raises(error, match=match):
        llm.generate(prompts, params)
    assert not llm.engine.has_unfinished_requests()  # a rejected call leaves nothing behind


def test_bad_settings_raise_clear_errors(small_model):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(TypeError):
        EngineConfig(max_num_seq=4)  # misspelled
    with pytest.raises(ValueError, match="max_model_len 4096 exceeds the model's context of 128"):
        LLMEngine(small_model, config=EngineConfig(max_model_len=4096))
    with pytest.raises(ValueError, match="less than one sequence"):
        LLMEngine(small_model, config=EngineConfig(num_kv_blocks=3, block_size=8))
    with pytest.raises(ValueError, match="chunked prefill"):
        LLMEngine(small_model, config=EngineConfig(enable_chunked_prefill=False,
                                                   max_num_batched_tokens=64))  # fmt: skip
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        LLMEngine(small_model).add_request([1, 2], SamplingParams(stop="x"))
    with pytest.raises(TypeError, match="text prompt needs a tokenizer"):
        LLMEngine(small_model).add_request("hello")
    with pytest.raises(ValueError, match="draft_model"):
        LLMEngine(small_model, config=EngineConfig(num_speculative_tokens=2))
