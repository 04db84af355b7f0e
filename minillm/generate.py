"""Reference generation: the plain, obviously-correct decoding loop.

Each step runs the model over the whole sequence so far (no KV cache), takes the logits
of the last position, and picks the next token. It is slow (step t costs O(t) forward
work, O(t^2) in total) and exactly what every faster path in minillm must reproduce.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from minillm.model import CausalLM
from minillm.sampling import check_sampling_args, sample_next_token


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
