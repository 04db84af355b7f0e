"""ZeRO stages 0-3 and offload against one process, and their memory against the paper.

Tolerances: see minillm.parallel.testing (fp32). Memory: the measured bytes of the tensors
a rank holds must be within 10% of the formula (the issue's target); in fact they differ
only by the padding of each unit to a multiple of N and Adam's step counters.
"""

import copy

import pytest
import torch
import torch.distributed as dist

from minillm.parallel import ZeroDataParallel, spawn
from minillm.parallel.testing import (
    GRAD_TOL,
    LOSS_RTOL,
    lm_loss,
    max_abs_diff,
    max_rel_diff,
    random_batches,
    tiny_model,
)
from minillm.parallel.zero_memory import (
    formula_for,
    measure_model_states,
    zero_model_state_bytes,
)

CONFIGS = [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)]


def _grad_shards_of(zero: ZeroDataParallel, ref) -> float:
    """Largest difference between this rank's gradient shards and the same slices of the
    single-process gradients, laid out like the units."""
    ref_params = dict(ref.named_parameters())
    names = {id(p): n for n, p in zero.module.named_parameters()}
    worst = 0.0
    for unit in [*zero.units, zero.root]:
        flat = torch.zeros(unit.full.numel())
        offset = 0
        for p in unit.params:
            flat[offset : offset + p.numel()] = ref_params[names[id(p)]].grad.reshape(-1)
            offset += p.numel()
        lo, hi = unit.shard_range
        worst = max(worst, max_abs_diff(unit.grad_shard.float().cpu(), flat[lo:hi]))
    return worst


def zero_worker(group) -> dict:
    p, r = group.size(), group.rank()
    out = {}
    for stage, offload in CONFIGS:
        key = f"stage{stage}{'_offload' if offload else ''}"
        ref, batches = tiny_model(), random_batches(3, 2 * p, 8, 256)
        zero = ZeroDataParallel(copy.deepcopy(ref), group, stage, lr=1e-2, offload=offload)
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        with torch.no_grad():  # stage 3: a no-grad forward gathers and frees each unit
            out[f"{key}_eval"] = max_abs_diff(zero(batches[0][0]), ref(batches[0][0]))
        out[f"{key}_eval_freed"] = stage < 3 or all(
            u.full.untyped_storage().nbytes() == 0 for u in [*zero.units, zero.root]
        )
        losses, ref_losses = [], []
        for step, (ids, targets) in enumerate(batches):
            ref_loss = lm_loss(ref(ids), targets)
            ref_loss.backward()
            loss = lm_loss(zero(ids.chunk(p)[r]), targets.chunk(p)[r])
            loss.backward()
            if step == 0:
                out[f"{key}_grads"] = _grad_shards_of(zero, ref)
                out[f"{key}_prefetched"] = zero.prefetched
            if step == 1:  # optimizer states exist now: measure before they change
                measured, formula = measure_model_states(zero), formula_for(zero)
                out[f"{key}_memory"] = (measured.as_dict(), formula.as_dict())
            opt.step()
            opt.zero_grad()
            zero.step()
            zero.zero_grad()
            total = loss.detach().clone()
            dist.all_reduce(total, group=group)
            losses.append(total.item() / p)
            ref_losses.append(ref_loss.item())
        out[f"{key}_losses"] = max_rel_diff(losses, ref_losses)
    # Mixed precision (bf16 parameters, fp32 Adam): the paper's 2 + 2 + 12 bytes.
    model = tiny_model().to(torch.bfloat16)
    zero = ZeroDataParallel(model, group, stage=2)
    ids, targets = random_batches(1, 2, 8, 256)[0]
    for _ in range(2):
        lm_loss(zero(ids), targets).backward()
        if zero.root.optimizer.state:
            break
        zero.step()
        zero.zero_grad()
    out["bf16_memory"] = (measure_model_states(zero).as_dict(), formula_for(zero).as_dict())
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def zero(request):
    return spawn(zero_worker, request.param)


def _key(stage, offload):
    return f"stage{stage}{'_offload' if offload else ''}"


@pytest.mark.dist
@pytest.mark.parametrize("stage,offload", CONFIGS)
def test_gradient_shards_equal_one_process(zero, stage, offload):
    for r, res in enumerate(zero):
        worst = res[f"{_key(stage, offload)}_grads"]
        assert worst < GRAD_TOL, f"rank {r}: gradient shard differs by {worst:.1e}"


@pytest.mark.dist
@pytest.mark.parametrize("stage,offload", CONFIGS)
def test_forward_equals_one_process(zero, stage, offload):
    for r, res in enumerate(zero):
        assert res[f"{_key(stage, offload)}_eval"] < GRAD_TOL, f"rank {r}: logits differ"
        assert res[f"{_key(stage, offload)}_eval_freed"], "stage 3 kept gathered parameters"


@pytest.mark.dist
def test_stage3_prefetches_the_next_layer(zero):
    # each forward finds layers 1..L-1 already being gathered, each backward L-2..0;
    # counted after a no-grad forward, then a training forward and backward
    layers = 4
    for r, res in enumerate(zero):
        assert res["stage3_prefetched"] == 3 * (layers - 1), f"rank {r}"
        assert res["stage2_prefetched"] == 0


@pytest.mark.dist
@pytest.mark.parametrize("stage,offload", CONFIGS)
def test_training_steps_give_the_same_losses(zero, stage, offload):
    for r, res in enumerate(zero):
        assert res[f"{_key(stage, offload)}_losses"] < LOSS_RTOL, f"rank {r}"


@pytest.mark.dist
@pytest.mark.parametrize("stage,offload", CONFIGS)
def test_measured_memory_is_within_10_percent_of_the_formula(zero, stage, offload):
    for r, res in enumerate(zero):
        measured, formula = res[f"{_key(stage, offload)}_memory"]
        for part in ("params", "grads", "optimizer", "device", "host"):
            m, f = measured[part], formula[part]
            assert abs(m - f) <= 0.10 * max(f, 1.0), f"rank {r} {part}: {m} vs formula {f}"


@pytest.mark.dist
def test_mixed_precision_memory_matches_2_2_12(zero):
    measured, formula = zero[0]["bf16_memory"]
    n = zero[0]["bf16_memory"][1]["params"] / 2  # params: 2 bytes each, not sharded
    assert formula["optimizer"] == pytest.approx(12 * n / len(zero))
    for part in ("params", "grads", "optimizer"):
        assert abs(measured[part] - formula[part]) <= 0.10 * formula[part], part


def test_formula_reproduces_the_papers_example():
    # ZeRO paper, Figure 1: Psi = 7.5B parameters, N = 64 GPUs, K = 12:
    # 120 GB, 31.4 GB, 16.6 GB, 1.9 GB per GPU.
    gb = [zero_model_state_bytes(7_500_000_000, 64, s).total / 1e9 for s in range(4)]
    assert gb == pytest.approx([120.0, 31.40625, 16.640625, 1.875])


def test_offload_moves_optimizer_and_gradients_to_the_host():
    m = zero_model_state_bytes(1000, 4, 2, offload=True)
    assert m.device == 2 * 1000 and m.host == (4 + 12) * 1000 / 4


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="stage must be one of"):
        ZeroDataParallel(tiny_model(), None, stage=4)
    with pytest.raises(ValueError, match="offload needs stage 2 or 3"):
        ZeroDataParallel(tiny_model(), None, stage=1, offload=True)
    with pytest.raises(ValueError, match="world_size"):
        zero_model_state_bytes(10, 0, 1)
