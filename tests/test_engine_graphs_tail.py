"""The decode graphs' tail (`minillm.kernels.greedy_feedback`): the kernel leaves the same
state as its PyTorch twin (token record, replay counter, next ids, positions, lengths and
slots) on irregular batches, tied maxima, padded vocabularies, a counter that wraps and
positions past the block table; CPU interpreter in fp32/fp16, bf16 at real sizes on the
GPU; bad input gets a clear error."""

import pytest
import torch
from minillm.kernels.greedy_feedback import greedy_feedback, greedy_feedback_ref

from minillm.engine.cuda_graphs import MAX_STEPS


def state(B, n, V, W, page, dtype, seed, device="cpu"):
    """Logits (B, V) with some tied maxima, and the static buffers of a (n,)-row graph."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g).to(dtype)
    for r in range(0, B, 3):  # ties: the first index must win
        a, b = sorted(torch.randint(0, V, (2,), generator=g).tolist())
        logits[r, a] = logits[r, b] = 50.0
    logits[B - 1, V - 1] = 60.0  # the maximum in the last (maybe padded) block
    meta = torch.zeros(4, n, dtype=torch.int32)
    meta[0] = torch.randint(0, V, (n,), generator=g)
    meta[1] = torch.randint(0, W * page + 3, (n,), generator=g)  # a few past the table
    meta[1, 0] = page - 1  # the next position opens a new block
    meta[2] = torch.randint(-1, 100, (n,), generator=g)
    meta[3] = meta[1] + 1
    tables = torch.randint(0, 500, (n, W), generator=g, dtype=torch.int32)
    valid = torch.rand(n, generator=g) < 0.7
    steps = torch.randint(0, V, (MAX_STEPS, n), generator=g)
    step = torch.tensor([seed % MAX_STEPS])
    return [t.to(device) for t in (logits, steps, step, meta, tables, valid)]


def run_both(B, n, V, W, page, dtype, seed, chunk=1024, device="cpu"):
    ref = state(B, n, V, W, page, dtype, seed, device)
    got = [t.clone() for t in ref]
    greedy_feedback_ref(*ref, page)
    greedy_feedback(*got, page, chunk=chunk)
    return ref, got


@pytest.mark.parametrize(
    "B, n, V, chunk, dtype, seed",
    [
        (1, 1, 4096, 1024, torch.float32, 0),
        (5, 8, 3000, 1024, torch.float16, 1),  # a padded last block
        (19, 24, 700, 128, torch.float32, MAX_STEPS - 1),  # two row blocks; the counter wraps
        (3, 4, 600, 1024, torch.float16, 2),  # one block only
    ],
)
def test_kernel_equals_the_pytorch_tail(B, n, V, chunk, dtype, seed):
    ref, got = run_both(B, n, V, 6, 16, dtype, seed, chunk)
    names = ["logits", "steps", "step", "meta", "tables", "valid"]
    for name, a, b in zip(names, ref, got, strict=True):
        assert torch.equal(a, b), name
    logits, steps, step, meta = ref[:4]
    s = (seed % MAX_STEPS + 1) % MAX_STEPS
    assert int(step) == s
    assert torch.equal(steps[seed % MAX_STEPS, :B], logits.argmax(-1))  # first of tied maxima
    assert torch.equal(meta[0, :B].long(), logits.argmax(-1))


def test_rows_past_the_batch_are_left_alone():
    ref = state(4, 10, 500, 5, 8, torch.float32, 3)
    got = [t.clone() for t in ref]
    greedy_feedback(*got, 8, chunk=128)
    assert torch.equal(got[3][:, 4:], ref[3][:, 4:])  # meta of rows 4.. (padding beyond B)
    assert torch.equal(got[1][:, 4:], ref[1][:, 4:])


def test_bad_input():
    logits, steps, step, meta, tables, valid = state(4, 8, 500, 5, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="meta must be int32"):
        greedy_feedback(logits, steps, step, meta.long(), tables, valid, 8)
    with pytest.raises(ValueError, match="meta must be int32"):
        greedy_feedback(logits, steps, step, meta[:, :2], tables, valid, 8)
    with pytest.raises(ValueError, match="int64"):
        greedy_feedback(logits, steps.int(), step, meta, tables, valid, 8)
    with pytest.raises(ValueError, match="tables"):
        greedy_feedback(logits, steps, step, meta, tables.long(), valid, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("B, V", [(1, 128256), (64, 128256), (37, 4096)])
def test_kernel_on_the_gpu(B, V):
    ref, got = run_both(B, 64, V, 130, 16, torch.bfloat16, B, device="cuda")
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
