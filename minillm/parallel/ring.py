"""Ring attention (Liu et al., 2023): causal attention over a sequence split across N ranks.

Rank i holds the queries, keys and values of one contiguous chunk of the sequence
(positions [i Tc, (i+1) Tc)). The key/value blocks travel around the ring i -> i+1: in N
steps every rank sees every block, computing attention of its queries against one block
at a time (blocks of the future, fully masked, are skipped) while the next block is in
flight. Per-block results are merged exactly with the online softmax (as in
FlashAttention): a block gives an output O_b (normalized within the block) and the
log-sum-exp of its scores L_b; two blocks combine as

    L = log(exp(L_1) + exp(L_2))
    O = exp(L_1 - L) O_1 + exp(L_2 - L) O_2

which equals softmax attention over the union of the keys. The backward passes the blocks
around the ring again, each carrying the gradient of its keys and values, accumulated by
every rank it visits, and hands it back to its owner at the end.

Memory per rank is O(Tc) instead of O(T); the price is N - 1 key/value transfers per
rank, overlapped with the block computations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from minillm.parallel import comm
from minillm.parallel.comm import CommStats, ProcessGroup


def block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(Tq, Tk) True where the query at q_pos may see the key at k_pos (causal, window)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def _acc(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 ones."""
    return torch.promote_types(t.dtype, torch.float32)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    qg = q.to(_acc(q)).view(B, Hkv, H // Hkv, Tq, D)  # (B, Hkv, G, Tq, D): a kv head's group
    s = torch.einsum("bkgtd,bksd->bkgts", qg, k.to(_acc(q))) * D**-0.5  # (B, Hkv, G, Tq, Tk)
    return s.masked_fill(~mask, float("-inf"))


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, Tq, D) on one block k/v (B, Hkv, Tk, D) under mask (Tq, Tk).

    Returns the block's normalized output (B, H, Tq, D) and log-sum-exp (B, H, Tq), in fp32
    (fp64 for fp64 inputs);
    a query that sees no key of the block gets output 0 and lse -inf."""
    B, H, Tq, D = q.shape
    s = _scores(q, k, mask)
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, G, Tq)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows without keys: 0, not nan
    out = torch.einsum("bkgts,bksd->bkgtd", p, v.to(p.dtype))
    return out.reshape(B, H, Tq, D), lse.reshape(B, H, Tq)


def merge_attention_blocks(
    out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the attention of the same queries over two disjoint sets of keys.

    out (B, H, T, D) and lse (B, H, T) of each part -> those of the union (online softmax)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)  # both -inf (no key anywhere yet): weight 0
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)
    return w1[..., None] * out1 + w2[..., None] * out2, lse


def _ring_pass(tensors, group, stats, op):
    """Send `tensors` to the next rank, receive the same shapes from the previous one."""
    p, r = dist.get_world_size(group), dist.get_rank(group)
    recv = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
    works = comm.send_recv(
        [(t.contiguous(), (r + 1) % p) for t in tensors],
        [(t, (r - 1) % p) for t in recv],
        group,
        stats,
        op,
    )
    return works, recv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, window, stats):
        p, r = dist.get_world_size(group), dist.get_rank(group)
        Tc = q.shape[2]
        q_pos = torch.arange(r * Tc, (r + 1) * Tc, device=q.device)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        k_cur, v_cur = k, v
        for step in range(p):
            j = (r - step) % p  # the block this rank holds at this step
            if step < p - 1:  # start moving the block on while we compute with it
                works, (k_next, v_next) = _ring_pass([k_cur, v_cur], group, stats, "ring_kv")
            k_pos = torch.arange(j * Tc, (j + 1) * Tc, device=q.device)
            mask = block_mask(q_pos, k_pos, window)
            if mask.any():  # skip blocks entirely in the future (or out of the window)
                out_b, lse_b = block_attention(q, k_cur, v_cur, mask)
                out, lse = merge_attention_blocks(out, lse, out_b, lse_b)
            if step < p - 1:
                comm.wait_all(works, "ring attention send/recv", group)
                k_cur, v_cur = k_next, v_next
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.window, ctx.stats = group, window, stats
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, window, stats = ctx.group, ctx.window, ctx.stats
        p, r = dist.get_world_size(group), dist.get_rank(group)
        B, H, Tc, D = q.shape
        Hkv, G = k.shape[1], H // k.shape[1]
        q_pos = torch.arange(r * Tc, (r + 1) * Tc, device=q.device)
        dout = dout.float()
        delta = (dout * out).sum(-1).view(B, Hkv, G, Tc)  # rowsum(dO * O)
        qg = q.float().view(B, Hkv, G, Tc, D)
        dog = dout.view(B, Hkv, G, Tc, D)
        lseg = lse.view(B, Hkv, G, Tc)
        dq = torch.zeros_like(qg)
        k_cur, v_cur = k, v
        dk_cur = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv_cur = torch.zeros_like(dk_cur)
        for step in range(p):
            j = (r - step) % p
            k_pos = torch.arange(j * Tc, (j + 1) * Tc, device=q.device)
            mask = block_mask(q_pos, k_pos, window)
            if mask.any():
                s = _scores(q, k_cur, mask)  # (B, Hkv, G, Tc, Tk)
                prob = torch.exp(s - lseg[..., None]).nan_to_num(0.0)
                dv_cur += torch.einsum("bkgts,bkgtd->bksd", prob, dog)
                dprob = torch.einsum("bkgtd,bksd->bkgts", dog, v_cur.float())
                ds = prob * (dprob - delta[..., None]) * D**-0.5
                dq += torch.einsum("bkgts,bksd->bkgtd", ds, k_cur.float())
                dk_cur += torch.einsum("bkgts,bkgtd->bksd", ds, qg)
            # The block moves on with its gradient; after the last step only the
            # gradient travels, one more hop, back to the block's owner.
            payload = [k_cur, v_cur, dk_cur, dv_cur] if step < p - 1 else [dk_cur, dv_cur]
            works, received = _ring_pass(payload, group, stats, "ring_kv_grad")
            comm.wait_all(works, "ring attention send/recv", group)
            if step < p - 1:
                k_cur, v_cur, dk_cur, dv_cur = received
            else:
                dk_cur, dv_cur = received
        dq = dq.view(B, H, Tc, D).to(q.dtype)
        return dq, dk_cur.to(k.dtype), dv_cur.to(v.dtype), None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: ProcessGroup,
    window: int | None = None,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's chunk: q (B, H, Tc, D), k/v (B, Hkv, Tc, D) ->
    (B, H, Tc, D), equal to rows [r Tc, (r+1) Tc) of full attention over all N chunks."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"expected q (B, H, Tc, D) and k, v (B, Hkv, Tc, D) of the same chunk, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot be grouped over {k.shape[1]} kv heads")
    return _RingAttention.apply(q, k, v, group, window, stats)
