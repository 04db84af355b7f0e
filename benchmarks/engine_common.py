"""Shared pieces of the engine benchmarks: models of real shapes with random weights, their
Hugging Face twins (same weights) for the `generate` baselines, workloads, timing.

Not a benchmark itself; `benchmarks/engine_*.py` import it.
"""

from __future__ import annotations

import gc
import random
import time

import torch

from minillm.config import ModelConfig
from minillm.model import CausalLM

SMOKE_CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


def build_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> CausalLM:
    """A random model of a preset's shape ("smoke": a tiny one), built on `device`."""
    config = ModelConfig(**SMOKE_CONFIG) if shape == "smoke" else ModelConfig.from_name(shape)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def hf_twin(model: CausalLM):
    """A transformers model with `model`'s weights (the names are the same)."""
    import transformers

    d = model.config.to_hf_dict()
    cfg = transformers.AutoConfig.for_model(**d)
    default = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    try:
        with torch.device(model.device):
            hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any("rotary" not in k and "lm_head" not in k for k in missing):
        raise RuntimeError(f"HF twin: missing {missing}, unexpected {unexpected}")
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    return hf


@torch.inference_mode()
def hf_generate(hf, prompts: list[list[int]], new_tokens: int, pad_id: int = 0) -> float:
    """Seconds for one static batch through `hf.generate` (greedy, exactly `new_tokens`
    new tokens for every row: end-of-sequence suppressed), prompts left-padded."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    dev = hf.device
    sync()
    t0 = time.perf_counter()
    hf.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)  # fmt: skip
    sync()
    return time.perf_counter() - t0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_requests(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int = 0
) -> list[tuple[list[int], int]]:
    """n (prompt token ids, output length) pairs with uniform lengths (token ids avoid 0)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randrange(1, vocab) for _ in range(rng.randint(*prompt_range))]
        out.append((p, rng.randint(*output_range)))
    return out


def decode_rate(output) -> float:
    """Decode tokens/s of one finished request: tokens after the first over their time."""
    t = output.metrics.token_times
    return (len(t) - 1) / max(t[-1] - t[0], 1e-9)
