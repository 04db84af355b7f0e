"""The offline API, shaped like vLLM's: `LLM(model, ...).generate(prompts, SamplingParams)`.

    llm = LLM("minillm-tiny", max_num_seqs=64)
    outputs = llm.generate(["def add(a, b):", "import os"], SamplingParams(temperature=0))
    for out in outputs:
        print(out.outputs[0].text, out.metrics.time_to_first_token)
    for delta in llm.stream("class Stack:", SamplingParams(max_tokens=64)):
        print(delta.text, end="")

`generate` queues every prompt, then steps the engine until all have finished, so the
scheduler batches them continuously; outputs come back in the prompts' order. `stream`
yields each new piece of text of one prompt as soon as it is final. The same engine runs
the static-batching baseline (`scheduling="static"`), speculative decoding
(`draft_model=..., num_speculative_tokens=k`), int8 weights (`quantization="int8"`) and
the fused layers of `minillm.engine.inject` (`fuse=True`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.engine.config import EngineConfig
from minillm.engine.engine import LLMEngine
from minillm.engine.sequence import RequestOutput
from minillm.model import CausalLM
from minillm.sampling_params import SamplingParams


@dataclass
class StreamDelta:
    """What one step added to a completion of a streamed prompt."""

    index: int  # which of the n completions
    text: str  # the new text ("" without a tokenizer, or while a character is incomplete)
    token_ids: list[int]  # the new tokens
    finish_reason: str | None  # set on the last delta of the completion
    output: RequestOutput  # the request so far


def _load(model, dtype, device) -> CausalLM:
    if isinstance(model, CausalLM):
        return model
    if isinstance(model, (str, Path)):
        from minillm.loading import load_model

        return load_model(model, dtype=dtype, device=device)
    raise TypeError(f"model must be a CausalLM, a bundled name or a folder, got {model!r:.60}")


class LLM:
    """A model, its tokenizer and an `LLMEngine` (keyword arguments: `EngineConfig`)."""

    def __init__(
        self,
        model: str | Path | CausalLM = "minillm-tiny",
        tokenizer=None,
        *,
        draft_model: str | Path | CausalLM | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        quantization=None,
        fuse: bool = False,
        use_triton: bool | None = None,
        **engine_kwargs,
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        target = _load(model, dtype, device)
        if tokenizer is None and isinstance(model, (str, Path)):
            from minillm.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(model)
        draft = None if draft_model is None else _load(draft_model, dtype, device)
        if quantization is not None:
            from minillm.engine.inject import quantize_weights

            target = quantize_weights(target, quantization)
        if fuse:
            from minillm.engine.inject import inject_fused_modules

            for m in (target, draft):
                if m is not None:
                    inject_fused_modules(m)
        config = EngineConfig(**engine_kwargs)
        self.tokenizer = tokenizer
        self.engine = LLMEngine(target, tokenizer, config, draft, use_triton)

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """The API over an engine built by hand (e.g. with a custom `EngineConfig`)."""
        llm = cls.__new__(cls)
        llm.engine, llm.tokenizer = engine, engine.tokenizer
        return llm

    @staticmethod
    def _prompts(prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one prompt of token ids
        if isinstance(prompts, Sequence):
            return list(prompts)
        raise TypeError(
            f"prompts: a str, a list of token ids, or a list of them; got {prompts!r:.60}"
        )

    def _add_all(self, prompts, sampling_params) -> list[str]:
        prompts = self._prompts(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.engine.add_request(prompt, p))
        except (TypeError, ValueError) as e:
            for rid in ids:  # nothing of a rejected call keeps running
                self.engine.abort_request(rid)
            raise type(e)(f"prompt {len(ids)}: {e}") from None
        return ids

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete every prompt (a str, token ids, or a list of either); one
        `RequestOutput` per prompt, in order. `sampling_params`: one for all or one each."""
        ids = self._add_all(prompts, sampling_params)
        wanted, done = set(ids), {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="requests", unit="req")
        try:
            while len(done) < len(ids):
                for out in self.engine.step(only_finished=True):
                    if out.request_id in wanted:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]

    def stream(
        self, prompt: str | list[int], sampling_params: SamplingParams | None = None
    ) -> Iterator[StreamDelta]:
        """Yield what each step adds to the completions of one prompt, as it comes. Text
        that could be the start of a stop string is held back until it cannot be."""
        (rid,) = self._add_all([prompt], sampling_params)
        params = sampling_params or SamplingParams()
        hold = max(map(len, params.stop), default=1) - 1
        sent: dict[int, tuple[int, int]] = {}  # completion -> (tokens, characters) sent
        ended: set[int] = set()
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    if out.error:
                        raise ValueError(out.error)
                    finished = out.finished
                    for c in out.outputs:
                        if c.index in ended:
                            continue
                        n_tok, n_chr = sent.get(c.index, (0, 0))
                        text = c.text or ""
                        end = len(text) if c.finish_reason else max(n_chr, len(text) - hold)
                        if len(c.token_ids) > n_tok or c.finish_reason:
                            yield StreamDelta(c.index, text[n_chr:end], c.token_ids[n_tok:],
                                              c.finish_reason, out)  # fmt: skip
                            sent[c.index] = (len(c.token_ids), end)
                        if c.finish_reason:
                            ended.add(c.index)
        finally:
            if not finished:
                self.engine.abort_request(rid)
