"""How to pick each next token of one request: `SamplingParams`, validated on creation.

The names, defaults and ranges are vLLM's (`vllm.SamplingParams`), which follow the OpenAI
API, so a request written for one reads the same in the other. The logits go through
penalties -> temperature -> top-k -> top-p -> min-p -> sample (`minillm.sampling`);
temperature 0 means greedy (argmax), and each filter has a value that turns it off:

    top_k = 0, top_p = 1, min_p = 0, repetition_penalty = 1, presence/frequency_penalty = 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def check_temperature(value: object) -> float:
    t = _number("temperature", value)
    if not t >= 0 or math.isinf(t):  # `not >=` also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {value}")
    return t


def check_top_k(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {value!r}")
    return value


def check_top_p(value: object) -> float:
    p = _number("top_p", value)
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {value}")
    return p


def check_min_p(value: object) -> float:
    p = _number("min_p", value)
    if not 0 <= p <= 1:
        raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {value}")
    return p


@dataclass
class SamplingParams:
    """Sampling settings of one request (vLLM's names and defaults).

    n: completions to return for the prompt (>= 1). Sample i uses seed + i when seeded.
    temperature: >= 0; logits are divided by it; 0 is greedy.
    top_k: keep the k most likely tokens (and ties with the k-th); 0 keeps all.
    top_p: keep the most likely tokens whose probabilities first sum to >= top_p; in (0, 1].
    min_p: keep tokens with probability >= min_p x the top probability; in [0, 1].
    repetition_penalty: > 0; logits of tokens seen in the prompt or output are divided by
        it when positive, multiplied when negative (CTRL, Keskar et al., 2019); 1 is off.
    presence_penalty: in [-2, 2]; subtracted once from the logit of every output token.
    frequency_penalty: in [-2, 2]; subtracted once per occurrence in the output.
    seed: makes the samples reproducible; None draws from torch's global generator.
    max_tokens: the most new tokens to generate (>= 1); None fills the model's context.
    stop: strings that end the completion (the text is cut before them).
    stop_token_ids: token ids that end the completion (kept in its token ids).
    ignore_eos: keep going past the model's end-of-sequence tokens.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        self.temperature = check_temperature(self.temperature)
        self.top_p = check_top_p(self.top_p)
        self.top_k = check_top_k(self.top_k)
        self.min_p = check_min_p(self.min_p)
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty)
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = _number(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2] (0 disables it), got {value}")
            setattr(self, name, value)
        if self.seed is not None:
            _integer("seed", self.seed)
        if self.max_tokens is not None and _integer("max_tokens", self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1 (or None), got {self.max_tokens}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        self.stop = stop
        ids = list(self.stop_token_ids or [])
        if not all(not isinstance(i, bool) and isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids must be integers >= 0, got {ids!r}")
        self.stop_token_ids = ids
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """Whether any of the repetition, presence and frequency penalties is on."""
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )
