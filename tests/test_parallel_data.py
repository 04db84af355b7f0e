"""Our DDP against torch's DistributedDataParallel and against one process (2 and 4 ranks).

Tolerances: see minillm.parallel.testing. Our DDP and torch's both average the same
per-rank gradients with an all-reduce; the sums may be ordered differently (buckets of
different sizes), so they agree within GRAD_TOL, not bitwise.
"""

import copy

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from minillm.parallel import DataParallel, spawn
from minillm.parallel.testing import (
    GRAD_TOL,
    LOSS_RTOL,
    lm_loss,
    max_abs_diff,
    max_rel_diff,
    named_grads,
    random_batches,
    reference_losses,
    tiny_model,
)


def ddp_worker(group) -> dict:
    p, r = group.size(), group.rank()
    ref = tiny_model()
    ((ids, targets),) = random_batches(1, 2 * p, 16, ref.config.vocab_size)
    mine = ids.chunk(p)[r], targets.chunk(p)[r]
    # Ours, with small buckets (several per backward), and torch's, on the same inputs.
    ours = DataParallel(copy.deepcopy(ref), group, bucket_cap_mb=0.05)
    torch_ddp = DistributedDataParallel(copy.deepcopy(ref), process_group=group)
    lm_loss(ours(mine[0]), mine[1]).backward()
    lm_loss(torch_ddp(mine[0]), mine[1]).backward()
    lm_loss(ref(ids), targets).backward()
    out = {
        "vs_torch_ddp": max_abs_diff(named_grads(ours.module), named_grads(torch_ddp.module)),
        "vs_one_process": max_abs_diff(named_grads(ours.module), named_grads(ref)),
        "buckets": len(ours.buckets),
        "overlapped": ours.overlapped,
    }
    # Gradient accumulation: two half-batches, the first under no_sync, equal one batch.
    acc = DataParallel(copy.deepcopy(ref), group)
    (ids_a, ids_b), (targets_a, targets_b) = mine[0].chunk(2), mine[1].chunk(2)
    with acc.no_sync():
        (lm_loss(acc(ids_a), targets_a) / 2).backward()
    (lm_loss(acc(ids_b), targets_b) / 2).backward()
    out["accumulation"] = max_abs_diff(named_grads(acc.module), named_grads(ref))
    # Three AdamW steps give the single-process losses.
    ref, batches = tiny_model(), random_batches(3, 2 * p, 16, 256)
    model = DataParallel(copy.deepcopy(ref), group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for ids, targets in batches:
        loss = lm_loss(model(ids.chunk(p)[r]), targets.chunk(p)[r])
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total, group=group)
        losses.append(total.item() / p)
    out["train_losses"] = max_rel_diff(losses, reference_losses(ref, batches))
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def ddp(request):
    return spawn(ddp_worker, request.param)


@pytest.mark.dist
def test_gradients_equal_torch_ddp_and_one_process(ddp):
    for r, res in enumerate(ddp):
        assert res["vs_torch_ddp"] < GRAD_TOL, f"rank {r}: differs from torch DDP"
        assert res["vs_one_process"] < GRAD_TOL, f"rank {r}: differs from the full batch"


@pytest.mark.dist
def test_buckets_are_reduced_during_the_backward(ddp):
    for res in ddp:
        assert res["buckets"] > 2
        assert res["overlapped"], "no bucket was launched before the backward ended"


@pytest.mark.dist
def test_no_sync_accumulates_locally(ddp):
    for r, res in enumerate(ddp):
        assert res["accumulation"] < GRAD_TOL, f"rank {r}: accumulated gradients differ"


@pytest.mark.dist
def test_training_steps_give_the_same_losses(ddp):
    for r, res in enumerate(ddp):
        assert res["train_losses"] < LOSS_RTOL, f"rank {r}: {res['train_losses']:.1e}"


def test_bad_bucket_size():
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        DataParallel(tiny_model(), group=None, bucket_cap_mb=0)
