"""The vocabulary split over tensor-parallel ranks: embedding and cross-entropy (Megatron-LM).

Rank i owns the vocabulary rows [i V/p, (i+1) V/p) of the embedding table and of the LM
head. VocabParallelEmbedding looks up the ids this rank owns, writes zeros for the others,
and g (all-reduce) sums the p partial results: every id is found on exactly one rank.

The LM head (a ColumnParallelLinear over V) leaves each rank with a (N, V/p) slice of the
logits z. The cross-entropy  loss = logsumexp(z) - z[target]  needs only three reductions
over the vocabulary, each an all-reduce of an (N,) vector instead of a gather of (N, V):

    m = max_v z           (all-reduce MAX, for stability)
    s = sum_v exp(z - m)  (all-reduce SUM)
    t = z[target] - m     (all-reduce SUM: only the owner of the target adds a non-zero)

and its gradient, softmax(z) - onehot(target), is computed locally on each slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minillm.parallel import comm
from minillm.parallel.comm import CommStats, ProcessGroup
from minillm.parallel.tensor import divide, mark_partition, reduce_from_tensor_parallel_region


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by vocabulary rows: rank i owns ids [i V/p, (i+1) V/p).

    Each rank looks up the ids it owns, writes zeros for the others, and g (all-reduce)
    sums the p partial results: every id is found on exactly one rank."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group: ProcessGroup,
        stats: CommStats | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.group, self.stats = group, stats
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        per_rank = divide(num_embeddings, self.world_size, "the vocabulary size")
        self.vocab_start, self.vocab_end = self.rank * per_rank, (self.rank + 1) * per_rank
        w = torch.empty(per_rank, embedding_dim, device=device, dtype=dtype)
        self.weight = mark_partition(nn.Parameter(w), 0)

    @classmethod
    def from_embedding(
        cls, emb: nn.Embedding, group: ProcessGroup, stats: CommStats | None = None
    ) -> VocabParallelEmbedding:
        w = emb.weight
        layer = cls(w.shape[0], w.shape[1], group, stats, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(layer.shard(w))
        return layer

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.vocab_start : self.vocab_end]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight)  # (B, T, C)
        partial = partial.masked_fill(outside[..., None], 0.0)
        return reduce_from_tensor_parallel_region(partial, self.group, self.stats)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, stats):
        # logits (N, V/p): this rank's vocabulary columns; target (N,) global ids.
        logits = logits.float()
        shard = logits.shape[-1]
        start = dist.get_rank(group) * shard
        row_max = logits.max(dim=-1).values  # (N,)
        comm.all_reduce(row_max, group, stats, op=dist.ReduceOp.MAX)
        logits = logits - row_max[:, None]  # stable: the global max becomes 0
        inside = (target >= start) & (target < start + shard)
        local_t = (target - start).masked_fill(~inside, 0)
        target_logit = logits.gather(1, local_t[:, None]).squeeze(1).masked_fill(~inside, 0.0)
        exp = logits.exp()
        sum_exp = exp.sum(dim=-1)
        both = torch.stack([target_logit, sum_exp])  # (2, N): one all-reduce for both sums
        comm.all_reduce(both, group, stats)
        target_logit, sum_exp = both
        ctx.save_for_backward(exp / sum_exp[:, None], inside, local_t)
        return sum_exp.log() - target_logit  # (N,) = logsumexp(z) - z_target

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, inside, local_t = ctx.saved_tensors
        grad = softmax.clone()  # d loss / d z = softmax(z) - onehot(target)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= inside.to(grad.dtype)
        return grad * grad_loss[:, None], None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: ProcessGroup,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy (N,) from vocabulary-sharded logits (N, V/p), in fp32.

    Equals `F.cross_entropy(full_logits, target, reduction="none")`; communicates two
    (N,) vectors (the row max, then the target logit and the sum of exponentials)
    instead of the (N, V) logits."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, V/p) and target (N,), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    return _VocabParallelCrossEntropy.apply(logits, target, group, stats)
