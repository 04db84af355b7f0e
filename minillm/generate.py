"""Generation: the plain reference loop, and the same loop with a KV cache.

The reference (`generate_stream`, `generate`) runs the model over the whole sequence so
far at each step (no KV cache), takes the logits of the last position, and picks the next
token. It is slow (step t costs O(t) forward work, O(t^2) in total) and exactly what every
faster path in minillm must reproduce.

`generate_cached` prefills the prompt into a KV cache once, then feeds one token per
step: `model(token, position, cache)`, O(1) projections and O(t) attention per step. It
takes a `SamplingParams` (penalties, min-p, stop strings, n completions) and returns
vLLM-shaped `CompletionOutput`s. Greedy, it gives the reference's tokens (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from minillm.cache import KVCache, StaticKVCache
from minillm.model import CausalLM
from minillm.sampling import SamplingMetadata, check_sampling_args, sample, sample_next_token
from minillm.sampling_params import SamplingParams


def _prompt_tensor(model: CausalLM, prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"prompt_ids must be one sequence (1-D), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("the prompt is empty: give at least one token")
    return ids.to(model.device)


@torch.no_grad()
def generate_stream(
    model: CausalLM,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one (the prompt is not repeated).

    Stops after `max_new_tokens` tokens or after a stop token (yielded, then stop);
    `stop_token_ids` defaults to the model's end-of-sequence ids. Temperature 0 is greedy.
    `seed` makes sampling reproducible. The prompt plus `max_new_tokens` must fit in the
    model's context.
    """
    check_sampling_args(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = _prompt_tensor(model, prompt_ids)
    context = model.config.max_position_embeddings
    if ids.numel() > context:
        raise ValueError(
            f"the prompt has {ids.numel()} tokens, more than the model's context of {context}"
        )
    if ids.numel() + max_new_tokens > context:
        raise ValueError(
            f"the prompt ({ids.numel()} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
            f"the model's context of {context} tokens; lower max_new_tokens to at most "
            f"{context - ids.numel()}"
        )
    stops = set(model.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    model.check_input_ids(ids[None])
    for _ in range(max_new_tokens):
        logits = model(ids[None], check_inputs=False)[0, -1]  # (V,): last position only
        token = sample_next_token(logits, temperature, top_k, top_p, generator)
        ids = torch.cat([ids, token.reshape(1)])
        yield int(token)
        if int(token) in stops:
            return


def generate(
    model: CausalLM,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    **kwargs,
) -> list[int]:
    """The new token ids of `generate_stream`, as a list."""
    return list(generate_stream(model, prompt_ids, max_new_tokens, **kwargs))


@dataclass
class CompletionOutput:
    """One completion of a prompt (vLLM's name and fields)."""

    index: int  # which of the n completions
    token_ids: list[int]  # the new tokens (a stop token included)
    finish_reason: str  # "stop" (end-of-sequence, stop token or stop string) or "length"
    text: str | None = None  # decoded, cut before a stop string; None without a tokenizer
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


def _find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string in `text`, as (index, string)."""
    found = [(text.find(s), s) for s in stops if s in text]
    return min(found) if found else None


@torch.no_grad()
def generate_cached(
    model: CausalLM,
    prompt_ids: Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    *,
    tokenizer=None,
    cache: KVCache | None = None,
) -> list[CompletionOutput]:
    """`params.n` completions of one prompt, with a KV cache (default: a `StaticKVCache`
    of prompt + max_tokens positions; pass an empty cache of n rows to choose another).

    The n completions are the n rows of one batch: the prompt is prefilled in each row,
    then every step feeds the n newest tokens at one position. A finished row keeps being
    computed (and ignored) until all are done. Stop strings need the `tokenizer`.
    """
    params = SamplingParams() if params is None else params
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer: pass tokenizer=...")
    ids = _prompt_tensor(model, prompt_ids)
    P, n, context = ids.numel(), params.n, model.config.max_position_embeddings
    if ids.numel() >= context:
        raise ValueError(f"the prompt has {P} tokens: no room left in the context of {context}")
    max_tokens = context - P if params.max_tokens is None else params.max_tokens
    if P + max_tokens > context:
        raise ValueError(
            f"the prompt ({P} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
            f"context of {context} tokens; lower max_tokens to at most {context - P}"
        )
    model.check_input_ids(ids[None])
    if cache is None:
        cache = StaticKVCache(model.config, n, P + max_tokens, model.dtype, model.device)
    elif cache.seq_len != 0:
        raise ValueError(f"the cache must be empty, it holds {cache.seq_len} positions")
    generators = None
    if params.seed is not None:
        generators = [
            torch.Generator(device=model.device).manual_seed(params.seed + i) for i in range(n)
        ]
    md = SamplingMetadata.from_params(
        [params] * n, model.config.vocab_size, [ids] * n, generators, model.device
    )
    eos = set() if params.ignore_eos else set(model.config.eos_token_ids)
    outputs = [CompletionOutput(i, [], "length") for i in range(n)]
    done = [False] * n

    # Prefill: the whole prompt in one forward, every row; keep the last position's logits.
    logits = model(ids.expand(n, P), torch.arange(P, device=ids.device), cache)[:, -1]  # (n, V)
    for step in range(max_tokens):
        tokens = sample(logits, md)  # (n,)
        md.append_output(tokens)
        for i, token in enumerate(tokens.tolist()):
            if done[i]:
                continue
            out = outputs[i]
            out.token_ids.append(token)
            if token in eos or token in params.stop_token_ids:
                out.finish_reason, done[i] = "stop", True
                out.stop_reason = None if token in eos else token
            if tokenizer is not None:
                out.text = tokenizer.decode(out.token_ids)
                hit = None if done[i] else _find_stop(out.text, params.stop)
                if hit is not None:
                    out.text = out.text[: hit[0]]
                    out.finish_reason, out.stop_reason, done[i] = "stop", hit[1], True
        if all(done) or step == max_tokens - 1:
            break
        # Decode: one new token per row at position P + step.
        position = torch.tensor([P + step], device=ids.device)  # (T,) with T = 1
        logits = model(tokens[:, None], position, cache, check_inputs=False)[:, -1]
    return outputs
