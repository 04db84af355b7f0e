"""The engine loop: requests in, one `step()` at a time: schedule -> run -> postprocess.

    step():  batch = scheduler.schedule()        which tokens of which sequences (+ KV blocks)
             logits = runner.execute(batch)      one packed forward over the paged pool
             tokens = sample(logits)             per-sequence SamplingParams
             postprocess(tokens)                 append, check stops, free finished blocks

This is the shape of nano-vllm's `LLMEngine` (and vLLM's), with no global state: the
engine owns its scheduler, block manager, KV pool and model runner, and `LLM`
(`minillm.engine.llm`) wraps it in the offline API. Requests that cannot run (a prompt as
long as the context) fail alone, with an error in their output; the others go on.
"""

from __future__ import annotations

import itertools
import time

import torch

from minillm.cache.block_manager import BlockManager
from minillm.cache.paged import PagedKVCache
from minillm.engine.config import EngineConfig
from minillm.engine.lookahead import run_multi_step
from minillm.engine.model_runner import BatchRow, ModelRunner
from minillm.engine.sampler import sample_tokens
from minillm.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from minillm.engine.sequence import RequestOutput, Sequence
from minillm.model import CausalLM
from minillm.sampling_params import SamplingParams

CPU_KV_LIMIT = 512 * 2**20  # bytes: the default pool on a CPU is at most this


class LLMEngine:
    """Continuous batching over a paged KV pool (see the module docstring)."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer=None,
        config: EngineConfig | None = None,
        draft_model: CausalLM | None = None,
        use_triton: bool | None = None,
    ):
        if not isinstance(model, CausalLM):
            raise TypeError(f"model must be a minillm CausalLM, got {type(model).__name__}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = cfg = (config or EngineConfig()).resolve(model.config.max_position_embeddings)
        if cfg.num_speculative_tokens and draft_model is None:
            raise ValueError("num_speculative_tokens > 0 needs a draft_model")
        on_cuda = model.device.type == "cuda"
        self.use_triton = on_cuda if use_triton is None else use_triton
        models = [model] + ([draft_model] if draft_model is not None else [])
        num_blocks = self._num_blocks(models)
        self.bm = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg, self.bm)
        # Lookahead positions (speculative or multi-step) may spill into scratch blocks past
        # the block manager's pool: per sequence, enough for the lookahead.
        lookahead = max(cfg.num_speculative_tokens, cfg.num_scheduler_steps - 1)
        self.scratch_block, self.scratch_per_seq = num_blocks, -(-lookahead // cfg.block_size)
        scratch = cfg.max_num_seqs * self.scratch_per_seq
        self.runners = runners = [self._runner(m, num_blocks + scratch) for m in models]
        self.runner = runners[0]
        self.spec = None
        if draft_model is not None and cfg.num_speculative_tokens:
            from minillm.engine.speculative import SpeculativeDecoder

            self.spec = SpeculativeDecoder(self, runners[0], runners[1])
        if on_cuda and cfg.cuda_graphs and self.use_triton:
            self.enable_decode_graphs()
        self.eos = tuple(model.config.eos_token_ids)
        self._requests: dict[str, tuple[list[Sequence], str | None]] = {}
        self._ids, self._seq_ids = itertools.count(), itertools.count()
        self._failed: set[str] = set()  # requests that failed when added, not yet reported
        self.num_steps = self.num_multi_steps = 0
        self.last_batch: SchedulerOutput | None = None  # what the last step ran

    def enable_decode_graphs(self, capture: bool = True) -> None:
        """Decode steps through static buffers, captured as CUDA graphs (capture=False runs
        them eagerly: the same code path on a CPU), and multi-step decoding on top."""
        cfg, k = self.config, self.config.num_speculative_tokens
        if capture and self.use_triton and not cfg.unified_attention:  # (its kernel: no tuning)
            for r in self.runners:
                r.warm_up_attention(cfg.max_num_batched_tokens)
        max_blocks = -(-cfg.max_model_len // cfg.block_size) + self.scratch_per_seq
        budget = cfg.max_num_batched_tokens
        full = min(cfg.full_graph_max_tokens, budget) if self.use_triton else 0
        for r, rows in zip(self.runners, (1 + k, 2), strict=False):  # decode rows per sequence
            r.capture_cuda_graphs(
                min(cfg.max_num_seqs * rows, cfg.cuda_graph_max_batch), max_blocks, capture
            )
            if full:  # steps with prompt chunks: the whole forward as one graph
                r.capture_full_graphs(full, cfg.max_num_seqs, max_blocks, capture)
            piecewise = min(cfg.piecewise_max_tokens, budget)
            if piecewise > full:  # larger steps: the pieces between attentions
                r.capture_piecewise_graphs(piecewise, capture, above=full)
        self.scheduler.multi_step = cfg.num_scheduler_steps

    def _num_blocks(self, models: list[CausalLM]) -> int:
        cfg, bs = self.config, self.config.block_size
        per_block = sum(PagedKVCache.bytes_per_block(m.config, bs, m.dtype) for m in models)
        need = cfg.max_num_seqs * -(-cfg.max_model_len // bs)  # every sequence at full length
        if cfg.num_kv_blocks is not None:
            n = cfg.num_kv_blocks
        elif cfg.kv_cache_memory is not None:
            n = cfg.kv_cache_memory // per_block
        elif models[0].device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(models[0].device)
            n = min(need, int(0.6 * free) // per_block)
        else:
            n = min(need, CPU_KV_LIMIT // per_block)
        if n * bs < cfg.max_model_len:
            raise ValueError(
                f"the KV pool holds {n} blocks of {bs} tokens = {n * bs} tokens, less than one "
                f"sequence of max_model_len={cfg.max_model_len}: give it more memory "
                f"(num_kv_blocks / kv_cache_memory) or lower max_model_len"
            )
        return n

    def _runner(self, model: CausalLM, num_blocks: int) -> ModelRunner:
        pool = PagedKVCache.for_model(model.config, num_blocks, self.config.block_size,
                                      dtype=model.dtype, device=model.device)  # fmt: skip
        unified = self.config.unified_attention and self.use_triton
        return ModelRunner(model, pool, self.use_triton, self.config.max_model_len, unified)

    # ---- requests ----------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty: give some text or token ids")
            if self.tokenizer is None:
                raise TypeError("a text prompt needs a tokenizer; pass token ids instead")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and set(map(type, prompt)) <= {int}:
            ids = list(prompt)  # (a bool, or a numpy integer, is not an `int` token id)
        else:
            raise TypeError(f"a prompt is a str or a list of token ids, got {prompt!r:.80}")
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        V = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(
                f"token ids must lie in [0, {V}), got values in [{min(ids)}, {max(ids)}]"
            )
        return ids

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a prompt (text or token ids); returns its request id. Bad prompts and
        parameters raise here; a prompt too long for the context fails in its output."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if self.spec is not None:
            self.spec.check_params(params)
        ids = self._prompt_ids(prompt)
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        device = self.model.device
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=device).manual_seed(params.seed + i)
            eos = () if params.ignore_eos else self.eos
            seq = Sequence(request_id, ids, params, i, eos, gen, next(self._seq_ids))
            if self.tokenizer is not None:
                seq.decoder, seq.has_text = self.tokenizer.stream_decoder(), True
            seqs.append(seq)
        self._requests[request_id] = (seqs, prompt if isinstance(prompt, str) else None)
        limit = self.config.max_model_len
        if len(ids) >= limit:
            for seq in seqs:
                seq.error = (
                    f"the prompt has {len(ids)} tokens, but the context holds {limit} "
                    f"(max_model_len): prompts of at most {limit - 1} tokens leave room to generate"
                )
                seq.finish("error")
            self._failed.add(request_id)
        else:
            for seq in seqs:
                self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> None:
        self._failed.discard(request_id)
        for seq in self._requests.pop(request_id, ([], None))[0]:
            self.scheduler.free(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- one step ------------------------------------------------------------------------
    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """Run one step; returns the outputs of the requests that progressed (all of them,
        or only those that finished: cheaper when nothing streams). A request that failed
        when it was added is reported (finished, with its error) by the next step."""
        touched, self._failed = self._failed, set()
        if self.scheduler.has_unfinished():
            batch = self.last_batch = self.scheduler.schedule()
            if batch.is_empty:
                raise RuntimeError("the scheduler found nothing to run (a bug: please report)")
            self.num_steps += 1
            if self.spec is not None:
                self.spec.step(batch)
            else:
                self._run(batch)
            for item in batch.scheduled:
                touched.add(item.seq.request_id)
                if item.seq.finished:
                    self.scheduler.free(item.seq)
        outputs = []
        for rid in sorted(touched, key=lambda r: self._requests[r][0][0].seq_id):
            seqs, prompt = self._requests[rid]
            finished = all(s.finished for s in seqs)
            if only_finished and not finished:
                continue
            outputs.append(RequestOutput.from_seqs(seqs, prompt))
            if finished:
                del self._requests[rid]
        return outputs

    def rows(self, items: list[ScheduledSeq]) -> list[BatchRow]:
        return [
            BatchRow(
                s.seq.token_ids[s.start : s.start + s.num_tokens],
                s.start,
                s.slots,
                self.bm.block_table(s.seq.seq_id),
                int(s.samples),
            )
            for s in items
        ]

    def _run(self, batch: SchedulerOutput) -> None:
        if run_multi_step(self, batch):
            return
        logits = self.runner.execute(self.rows(batch.scheduled), len(batch.decodes))
        sampled = [item for item in batch.scheduled if item.samples]
        seqs, argmax = [i.seq for i in sampled], self.runner.graph_argmax
        tokens = sample_tokens(logits, seqs, argmax).tolist() if sampled else []
        now = time.perf_counter()
        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_tokens
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
        for item, token in zip(sampled, tokens, strict=True):
            self.append_token(item.seq, token, now)

    def append_token(self, seq: Sequence, token: int, now: float) -> None:
        """Add a sampled token; finish the sequence if a stop condition holds (in
        `generate_cached`'s order: stop tokens, stop strings, then the length limits)."""
        seq.token_ids.append(token)
        seq.token_times.append(now)
        p = seq.params
        piece = seq.decoder.push(token) if seq.decoder is not None else ""
        seq.text += piece
        if token in seq.eos_token_ids:
            seq.finish("stop")
        elif token in p.stop_token_ids:
            seq.finish("stop", token)
        elif p.stop and (hit := _find_stop(seq.text, piece, p.stop)) is not None:
            seq.text, seq.decoder = seq.text[: hit[0]], None  # cut before the stop string
            seq.finish("stop", hit[1])
        elif seq.num_tokens >= self.config.max_model_len or (
            p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens
        ):
            seq.finish("length")


def _find_stop(text: str, piece: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that the newest `piece` completes: (index in text, string)."""
    start = max(0, len(text) - len(piece) - max(map(len, stops)) + 1)
    found = [(i, s) for s in stops if (i := text.find(s, start)) >= 0]
    return min(found) if found else None
