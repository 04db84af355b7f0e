"""Speculative decoding: a small draft model proposes k tokens, the target checks them at once.

Leviathan et al. (ICML 2023) and Chen et al. (2023): the draft samples x_1..x_k from its
distributions q_1..q_k; one target forward over the k + 1 positions gives p_1..p_{k+1};
then, for j = 1..k,

    accept x_j with probability min(1, p_j(x_j) / q_j(x_j));
    at the first rejection, emit y ~ normalize(max(0, p_j - q_j)) and stop;
    if all k are accepted, emit a bonus token y ~ p_{k+1}.

Every emitted token is distributed exactly as the target alone would sample it, so the
draft changes the speed, never the output. Greedy (temperature 0) is the special case of
one-hot p and q: accept while the draft's token equals the target's argmax. A round costs
k draft steps and one target step, and yields 1 + (accepted) tokens; with per-token
acceptance rate a that is (1 - a^(k+1)) / (1 - a) tokens on average.

In the engine, drafts of every decoding sequence run batched: the draft model keeps its own
paged pool with the same block tables, the k speculative positions of each sequence live in
scratch slots past the block manager's blocks, and the accepted ones move to the slots the
block manager gives them (rejected ones are simply never copied). On a GPU, a greedy round
stays on the device: the draft's k graph replays feed each other's argmax, the target's
verification graph takes the guesses from the device, and the host waits once, for the
guesses and the target's argmaxes together (`_round_on_device`).
"""

from __future__ import annotations

import time

import torch

from minillm.engine.lookahead import commit_lookahead, lookahead_tables
from minillm.engine.model_runner import BatchRow, ModelRunner
from minillm.engine.sampler import sample_tokens, token_probs
from minillm.engine.scheduler import SchedulerOutput
from minillm.sampling import greedy_argmax
from minillm.sampling_params import SamplingParams


def rejection_sample(
    draft_tokens: list[int],
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The tokens a round emits: the accepted prefix of `draft_tokens` (k,) and one more.
    draft_probs (k, V) are the q_j the drafts were sampled from, target_probs (k + 1, V)
    the target's p_j at the same positions."""
    k = len(draft_tokens)
    if draft_probs.shape[0] != k or target_probs.shape[0] != k + 1:
        raise ValueError(
            f"{k} draft tokens need draft_probs (k, V) and target_probs (k + 1, V), got "
            f"{tuple(draft_probs.shape)} and {tuple(target_probs.shape)}"
        )
    out = []
    u = torch.rand(k, generator=generator, device=target_probs.device, dtype=torch.float64)
    for j, x in enumerate(draft_tokens):
        p, q = target_probs[j, x].double(), draft_probs[j, x].double()
        if u[j] * q < p:  # u < p / q, i.e. accept with probability min(1, p / q)
            out.append(x)
            continue
        residual = (target_probs[j].double() - draft_probs[j].double()).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: p itself is the residual
            residual = target_probs[j].double()
        y = torch.multinomial(residual / residual.sum(), 1, generator=generator)
        return [*out, int(y)]
    bonus = torch.multinomial(target_probs[k].double(), 1, generator=generator)
    return [*out, int(bonus)]


def greedy_verify(draft_tokens: list[int], target_argmax: list[int]) -> list[int]:
    """Temperature 0: keep drafts while they equal the target's argmax, then the target's
    own token (the correction, or the bonus when all k were right)."""
    out = []
    for x, t in zip(draft_tokens, target_argmax, strict=False):
        if x != t:
            break
        out.append(x)
    return [*out, target_argmax[len(out)]]


def expected_tokens_per_round(acceptance: float, k: int) -> float:
    """Mean tokens a round emits when each draft is accepted with probability `acceptance`."""
    if acceptance >= 1:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


class SpeculativeDecoder:
    """Runs the engine's steps with a draft model (`LLMEngine(..., draft_model=...)`).

    Speculative positions n .. n + k - 1 of a sequence holding n tokens follow its block
    table: the free slots of its last block, then scratch blocks past the block manager's
    pool. So every draft step and the verification are batches of one-token decode rows
    (the verification "expands" each sequence into k + 1 rows, one per position), which a
    CUDA graph can replay; accepted tokens that landed in scratch blocks are copied to the
    blocks the block manager then gives them."""

    def __init__(self, engine, target: ModelRunner, draft: ModelRunner):
        self.engine, self.target, self.draft = engine, target, draft
        self.k = engine.config.num_speculative_tokens
        if target.model.config.vocab_size != draft.model.config.vocab_size:
            raise ValueError(
                f"the draft's vocabulary ({draft.model.config.vocab_size}) differs from the "
                f"target's ({target.model.config.vocab_size}): they must share a tokenizer"
            )
        self.num_rounds = self.num_drafted = self.num_accepted = 0
        self.num_device_rounds = 0  # greedy rounds with one synchronization
        # False: greedy graph rounds wait twice (for the drafts, then for the verification),
        # the round before `_round_on_device` existed; kept to measure the difference.
        self.device_rounds = True

    @staticmethod
    def check_params(params: SamplingParams) -> None:
        if params.has_penalties:
            raise ValueError(
                "speculative decoding supports temperature, top-k, top-p and min-p, not the "
                "repetition/presence/frequency penalties"
            )

    def _propose(self, logits: torch.Tensor, seqs: list) -> tuple[list[int], torch.Tensor | None]:
        """Draft tokens from the draft's logits (B, V), and the q they were drawn from."""
        if all(s.params.greedy for s in seqs):
            return greedy_argmax(logits).tolist(), None
        probs = token_probs(logits, seqs)
        return sample_probs(probs, seqs), probs

    def _decode_rows(self, seq, tokens, start, table, logits_last=True) -> list[BatchRow]:
        """One decode row per token of `tokens` at positions start, start + 1, ..."""
        bs = self.engine.config.block_size
        return [BatchRow([t], p, [table[p // bs] * bs + p % bs], table,
                         int(logits_last and p == start + len(tokens) - 1))
                for p, t in enumerate(tokens, start)]  # fmt: skip

    def _draft(self, batch, spec, tables):
        """The draft catches up on the scheduled tokens (1 or 2 per decode, the prompt
        chunks), proposes each speculating sequence's first token, then the next k - 1."""
        bm = self.engine.bm
        rows, chunks = [], []
        for it in batch.scheduled:
            seq, end, a = it.seq, it.start + it.num_tokens, it.seq.num_draft_computed
            if it in batch.decodes:
                table = tables.get(seq.seq_id) or bm.block_table(seq.seq_id)
                rows += self._decode_rows(seq, seq.token_ids[a:end], a, table, it.num_lookahead > 0)
            else:
                chunks.append(BatchRow(seq.token_ids[a:end], a, bm.slot_mapping(seq.seq_id, a, end),
                                       bm.block_table(seq.seq_id), 0))  # fmt: skip
        logits = self.draft.execute(rows + chunks, len(rows))
        drafted = {it.seq.seq_id: [] for it in spec}
        qs = {it.seq.seq_id: [] for it in spec}
        for j in range(self.k):
            active = [it for it in spec if it.num_lookahead > j]
            if not active:
                break
            if j > 0:  # draft steps 2..k: one decode row each
                rows = []
                for it in active:
                    sid = it.seq.seq_id
                    rows += self._decode_rows(it.seq, drafted[sid][-1:], it.start + j, tables[sid])
                logits = self.draft.execute(rows, len(rows))
            tokens, probs = self._propose(logits, [it.seq for it in active])
            for i, it in enumerate(active):
                drafted[it.seq.seq_id].append(tokens[i])
                qs[it.seq.seq_id].append(None if probs is None else probs[i])
        return drafted, qs

    def _greedy_graph_drafts(self, batch, spec) -> bool:
        graphs = self.draft.graphs
        return bool(
            spec and graphs is not None and not batch.prefills and graphs.fits(len(spec))
            and all(it.seq.params.greedy for it in spec)
        )  # fmt: skip

    def _draft_on_graph(self, batch, spec, tables):
        """Greedy drafts with the draft's decode graph: its argmax feeds the next step on the
        GPU (`CUDAGraphs.run_steps`), so k draft tokens cost one synchronization."""
        pre = self._catch_up_rows(batch)
        if pre:
            self.draft.execute(pre, len(pre))
        rows = [BatchRow(it.seq.token_ids[it.start : it.start + 1], it.start, it.slots,
                         tables[it.seq.seq_id]) for it in spec]  # fmt: skip
        steps = max(it.num_lookahead for it in spec)
        tokens = self.draft.graphs.run_steps(rows, steps).T.tolist()  # (B, steps)
        return {it.seq.seq_id: tokens[i][: it.num_lookahead] for i, it in enumerate(spec)}

    def _catch_up_rows(self, batch) -> list[BatchRow]:
        """Decode rows (no logits) of the tokens the draft has not computed yet, other than
        each speculating sequence's last one (which starts its drafts)."""
        bm, pre = self.engine.bm, []
        for it in batch.decodes:
            seq, a, n = it.seq, it.seq.num_draft_computed, it.start + 1
            last = n - 1 if it.num_lookahead else n
            rows = self._decode_rows(seq, seq.token_ids[a:last], a, bm.block_table(seq.seq_id))
            for r in rows:
                r.num_logits = 0
            pre += rows
        return pre

    def _on_device(self, batch, spec) -> bool:
        """Whether the whole round can stay on the device (`_round_on_device`)."""
        graphs = self.target.graphs
        rows = sum(1 + it.num_lookahead for it in batch.decodes)
        return self.device_rounds and (
            self._greedy_graph_drafts(batch, spec) and graphs is not None and graphs.fits(rows)
            and all(it.seq.params.greedy for it in batch.decodes)
        )  # fmt: skip

    def _round_on_device(self, batch, spec, tables) -> dict[int, list[int]]:
        """A greedy round with one synchronization: the draft's k graph replays leave their
        guesses on the device, the target's verification graph reads them from there, and
        only its argmaxes and the guesses come back, together. The host builds the target's
        inputs while the GPU runs the draft (vs two waits and an idle GPU in between)."""
        draft = self.draft.graphs
        pre = self._catch_up_rows(batch)
        if pre and not draft.fits(len(pre) + len(spec)):
            self.draft.execute(pre, len(pre))
            pre = []
        rows = pre + [BatchRow(it.seq.token_ids[it.start : it.start + 1], it.start, it.slots,
                               tables[it.seq.seq_id]) for it in spec]  # fmt: skip
        steps = max(it.num_lookahead for it in spec)
        guesses = draft.run_steps(rows, steps)[:, len(pre) :]  # (steps, S), still on the GPU
        plain = [it for it in batch.decodes if it.num_lookahead == 0]
        rows, dst, src, at = self.engine.rows(plain), [], [], []
        for s, it in enumerate(spec):
            L, first = it.num_lookahead, len(rows)
            tokens = it.seq.token_ids[it.start : it.start + 1] + [0] * L  # guesses: filled in
            rows += self._decode_rows(it.seq, tokens, it.start, tables[it.seq.seq_id], False)
            dst += range(first + 1, first + 1 + L)
            src += [j * len(spec) + s for j in range(L)]
            at.append(first)
        for r in rows:
            r.num_logits = 1
        self.target.num_graph_steps += 1
        self.num_device_rounds += 1
        best = self.target.graphs.run_filled(rows, dst, src, guesses)  # argmaxes, on the GPU
        host = torch.cat([guesses.reshape(-1), best]).tolist()  # the round's one wait
        guessed, best = host[: guesses.numel()], host[guesses.numel() :]
        emitted = {it.seq.seq_id: [best[i]] for i, it in enumerate(plain)}
        for s, (it, first) in enumerate(zip(spec, at, strict=True)):
            drafts = [guessed[j * len(spec) + s] for j in range(it.num_lookahead)]
            emitted[it.seq.seq_id] = greedy_verify(drafts, best[first : first + len(drafts) + 1])
        return emitted

    @torch.inference_mode()
    def step(self, batch: SchedulerOutput) -> None:
        eng = self.engine
        spec = [it for it in batch.decodes if it.num_lookahead > 0]
        tables = lookahead_tables(eng, spec)  # block tables + this step's scratch blocks
        if self._on_device(batch, spec):
            self._postprocess(batch, self._round_on_device(batch, spec, tables), tables)
            return
        if self._greedy_graph_drafts(batch, spec):
            drafted, qs = self._draft_on_graph(batch, spec, tables), {}
        else:
            drafted, qs = self._draft(batch, spec, tables)
        # 3. The target verifies: each speculating decode as k + 1 decode rows (a batch a
        #    CUDA graph can replay), or, without graphs, as one row of k + 1 tokens (its
        #    pages gathered once for all k + 1 queries).
        plain = [it for it in batch.decodes if it.num_lookahead == 0]
        rows, verify = eng.rows(plain), []
        for it in spec:
            sid = it.seq.seq_id
            tokens = it.seq.token_ids[it.start : it.start + 1] + drafted[sid]
            expanded = self._decode_rows(it.seq, tokens, it.start, tables[sid], logits_last=False)
            if self.target.graphs is not None:
                for r in expanded:
                    r.num_logits = 1
                rows += expanded
            else:
                slots = [r.slots[0] for r in expanded]
                verify.append(BatchRow(tokens, it.start, slots, tables[sid], len(tokens)))
        logits = self.target.execute(rows + verify + eng.rows(batch.prefills), len(rows))
        # 4. Accept, sample, append; accepted tokens in scratch blocks move to real blocks.
        emitted: dict[int, list[int]] = {}
        at = len(plain)
        spans = []
        for it in spec:
            spans.append((it, at, at + it.num_lookahead + 1))
            at += it.num_lookahead + 1
        normal = plain + [it for it in batch.prefills if it.samples]
        normal_rows = list(range(len(plain))) + list(range(at, at + len(normal) - len(plain)))
        if normal:
            tokens = sample_tokens(logits[normal_rows], [it.seq for it in normal]).tolist()
            emitted.update({it.seq.seq_id: [t] for it, t in zip(normal, tokens, strict=True)})
        if spec:
            self._accept(logits, spans, drafted, qs, emitted)
        self._postprocess(batch, emitted, tables)

    def _postprocess(self, batch, emitted, tables) -> None:
        eng, now = self.engine, time.perf_counter()
        for it in batch.scheduled:
            seq = it.seq
            seq.first_scheduled_time = seq.first_scheduled_time or now
            seq.num_computed_tokens += it.num_tokens
            new = emitted.get(seq.seq_id, [])
            for t in new:
                eng.append_token(seq, t, now)
                if seq.finished:
                    break
            if not it.num_lookahead:
                seq.num_draft_computed = seq.num_computed_tokens
                continue
            m, n = len(new) - 1, seq.num_computed_tokens  # m drafts accepted
            self.num_rounds += 1
            self.num_drafted += it.num_lookahead
            self.num_accepted += m
            seq.num_draft_tokens += it.num_lookahead
            seq.num_accepted_tokens += m
            if not seq.finished and m:  # the accepted drafts join the blocks
                commit_lookahead(eng, seq, m, tables[seq.seq_id])
            seq.num_draft_computed = n + min(m, it.num_lookahead - 1)

    def _accept(self, logits, spans, drafted, qs, emitted) -> None:
        seqs = [it.seq for it, a, b in spans for _ in range(b - a)]
        rows = logits[[i for _, a, b in spans for i in range(a, b)]]  # (sum (k_s + 1), V)
        at = 0
        if all(s.params.greedy for s in seqs):
            best = greedy_argmax(rows).tolist()
            for it, a, b in spans:
                emitted[it.seq.seq_id] = greedy_verify(
                    drafted[it.seq.seq_id], best[at : at + b - a]
                )
                at += b - a
            return
        p = token_probs(rows, seqs)
        for it, a, b in spans:
            sid, k = it.seq.seq_id, b - a - 1
            q = torch.stack(qs[sid][:k])
            emitted[sid] = rejection_sample(drafted[sid], q, p[at : at + k + 1], it.seq.generator)
            at += b - a


def sample_probs(probs: torch.Tensor, seqs: list) -> list[int]:
    """One token per row of probs (B, V), from each sequence's generator when seeded."""
    out = []
    for i, s in enumerate(seqs):
        out.append(int(torch.multinomial(probs[i], 1, generator=s.generator)))
    return out
