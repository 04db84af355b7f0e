"""A request's state inside the engine: `Sequence`, and what the engine returns: `RequestOutput`.

A request with `SamplingParams(n=...)` becomes n sequences. Each sequence is a list of
token ids, prompt then output, of which the first `num_computed_tokens` have their keys
and values in the paged pool. One engine step computes a slice of the rest: a prefill
chunk, or the single newest token (a decode step). Whenever the computed tokens reach the
end of the list, the step's logits give the next token, and the list grows by one:

    num_computed_tokens <= num_tokens;   decode  <=>  num_computed_tokens == num_tokens - 1

A preempted sequence (its blocks were taken back) restarts from num_computed_tokens = 0
and recomputes its tokens, prompt and output alike (vLLM's preemption by recompute).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from minillm.generate import CompletionOutput
from minillm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # in the waiting queue (new, or preempted)
    RUNNING = "running"  # owns KV blocks
    FINISHED = "finished"


@dataclass(eq=False)  # identity: two sequences are never "equal"
class Sequence:
    """One completion being generated (names follow vLLM)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the request's n completions
    eos_token_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = None  # seeded requests sample from their own
    seq_id: int = 0  # unique within an engine (which numbers its sequences)
    arrival_time: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hits at the last admission
        self.num_draft_computed = 0  # speculative decoding: tokens in the draft's cache
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.text = ""
        self.decoder = None  # a tokenizer's StreamDecoder while text is still coming
        self.has_text = False  # detokenized (the engine has a tokenizer)
        self.first_scheduled_time: float | None = None
        self.token_times: list[float] = []  # when each output token was produced
        self.finished_time: float | None = None
        self.num_draft_tokens = self.num_accepted_tokens = 0  # speculative statistics

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_computed_tokens == self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.finished_time = time.perf_counter()
        if self.decoder is not None:
            self.text += self.decoder.flush()
            self.decoder = None

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            self.index,
            self.output_token_ids,
            self.finish_reason,  # None while running
            self.text if self.has_text else None,
            self.stop_reason,
        )


@dataclass
class RequestMetrics:
    """Timings of a request (seconds of `time.perf_counter`), as vLLM reports them."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    token_times: list[float]  # every output token of the first completion
    num_cached_tokens: int
    num_preemptions: int

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def time_between_tokens(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]


@dataclass
class RequestOutput:
    """What `LLM.generate` returns per prompt (vLLM's fields). A request that could not run
    (e.g. a prompt longer than the context) has `error` set and finish_reason "error"."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None
    num_draft_tokens: int = 0  # speculative decoding: tokens proposed and accepted
    num_accepted_tokens: int = 0

    @classmethod
    def from_seqs(cls, seqs: list[Sequence], prompt: str | None) -> RequestOutput:
        first = seqs[0]
        times = first.token_times
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=min((s.token_times[0] for s in seqs if s.token_times), default=None),
            finished_time=max((s.finished_time or 0 for s in seqs), default=None)
            if all(s.finished for s in seqs)
            else None,
            token_times=list(times),
            num_cached_tokens=first.num_cached_tokens,
            num_preemptions=sum(s.num_preemptions for s in seqs),
        )
        error = next((s.error for s in seqs if s.error), None)
        return cls(
            request_id=first.request_id,
            prompt=prompt,
            prompt_token_ids=list(first.prompt_token_ids),
            outputs=[s.completion() for s in seqs],
            finished=all(s.finished for s in seqs),
            metrics=metrics,
            error=error,
            num_draft_tokens=sum(s.num_draft_tokens for s in seqs),
            num_accepted_tokens=sum(s.num_accepted_tokens for s in seqs),
        )
