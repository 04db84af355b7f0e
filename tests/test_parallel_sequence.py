"""Sequence parallelism: ring attention and Ulysses against full attention and one process.

The online-softmax merge is checked in fp64 against softmax attention (exact to 1e-12).
The distributed runs are fp32 with the naive attention as reference: GRAD_TOL and
LOSS_RTOL of minillm.parallel.testing.
"""

import copy

import pytest
import torch

from minillm.layers.attention import causal_mask, naive_attention
from minillm.parallel import CommStats, spawn
from minillm.parallel.ring import block_attention, block_mask, merge_attention_blocks
from minillm.parallel.sequence import (
    SequenceParallelAttention,
    all_reduce_gradients,
    apply_sequence_parallel,
    sequence_parallel_bytes,
    sequence_parallel_loss,
    shard_sequence,
)
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
from minillm.parallel.ulysses import check_ulysses

METHODS = ("ring", "ulysses")
VARIANTS = {
    "llama": {},
    "qwen3_window": dict(
        architecture="Qwen3ForCausalLM", qk_norm=True, sliding_window=5, num_key_value_heads=4
    ),
}


# ------------------------------------------------------------------ the merge (no processes)
@pytest.mark.parametrize("window", [None, 3])
def test_blockwise_attention_with_online_softmax_merge_equals_full_attention(window):
    torch.manual_seed(0)
    B, H, Hkv, T, D, blocks = 2, 4, 2, 12, 8, 4
    q = torch.randn(B, H, T, D, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, T, D, dtype=torch.float64) for _ in range(2))
    kr, vr = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ kr.transpose(-1, -2)) / D**0.5  # fp64 softmax attention: the oracle
    full = scores.masked_fill(~causal_mask(T, T, window), float("-inf")).softmax(-1) @ vr
    assert max_abs_diff(full, naive_attention(q, k, v, window=window)) < 1e-5  # fp32 inside
    pos = torch.arange(T)
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    lse = torch.full((B, H, T), float("-inf"), dtype=torch.float64)
    for kb in pos.chunk(blocks):  # key blocks in any order: the merge is commutative
        mask = block_mask(pos, kb, window)
        o_b, l_b = block_attention(q, k[:, :, kb], v[:, :, kb], mask)
        out, lse = merge_attention_blocks(out, lse, o_b, l_b)
    assert o_b.dtype == torch.float64
    assert max_abs_diff(out, full) < 1e-12  # fp64 throughout: exact up to rounding
    assert torch.isfinite(lse).all()


def test_a_block_no_query_can_see_gives_zero_output_and_minus_inf_lse():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    out, lse = block_attention(q, k, k, block_mask(torch.arange(3), torch.arange(10, 13)))
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_bad_sequence_parallel_arguments():
    with pytest.raises(ValueError, match="heads"):
        check_ulysses(8, 4, 3)
    attn = tiny_model().model.layers[0].self_attn
    with pytest.raises(ValueError, match="unknown sequence-parallel method"):
        SequenceParallelAttention(attn, None, "zigzag")
    sp_attn = SequenceParallelAttention(attn, None, "ring")
    with pytest.raises(ValueError, match="KV cache"):
        sp_attn(torch.zeros(1, 2, 64), None, None, "sdpa", cache=object())


# ------------------------------------------------------------------ gloo processes
def _one_step(group, method: str, variant: str) -> dict:
    ref = tiny_model(**VARIANTS[variant])
    stats = CommStats()
    sp = apply_sequence_parallel(copy.deepcopy(ref), group, method, stats)
    ((ids, targets),) = random_batches(1, 2, 16, ref.config.vocab_size)
    logits_ref = ref(ids)
    lm_loss(logits_ref, targets).backward()
    local_ids, positions = shard_sequence(ids, group)
    local_targets, _ = shard_sequence(targets, group)
    logits = sp(local_ids, positions=positions)
    stats_fwd = stats.as_dict()
    loss = sequence_parallel_loss(logits, local_targets, targets.numel())
    loss.backward()
    all_reduce_gradients(sp, group)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total, group=group)
    return {
        "logits": max_abs_diff(logits, logits_ref[:, positions]),
        "loss": abs(total.item() - lm_loss(logits_ref, targets).item()),
        "grads": max_abs_diff(named_grads(sp), named_grads(ref)),
        "forward_bytes": stats_fwd["bytes_sent"],
    }


def _training(group, method: str) -> float:
    ref, batches = tiny_model(), random_batches(3, 2, 16, 256)
    sp = apply_sequence_parallel(copy.deepcopy(ref), group, method)
    opt = torch.optim.AdamW(sp.parameters(), lr=1e-2)
    losses = []
    for ids, targets in batches:
        local_ids, positions = shard_sequence(ids, group)
        loss = sequence_parallel_loss(
            sp(local_ids, positions=positions), shard_sequence(targets, group)[0], targets.numel()
        )
        loss.backward()
        all_reduce_gradients(sp, group)
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total, group=group)
        losses.append(total.item())
    return max_rel_diff(losses, reference_losses(ref, batches))


def sequence_worker(group) -> dict:
    out = {}
    for method in METHODS:
        for variant in VARIANTS:
            out[(method, variant)] = _one_step(group, method, variant)
        out[(method, "train")] = _training(group, method)
    try:
        shard_sequence(torch.zeros(1, 15, dtype=torch.long), group)
        out["bad_length"] = "no error"
    except ValueError as e:
        out["bad_length"] = str(e)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def seq(request):
    return request.param, spawn(sequence_worker, request.param)


@pytest.mark.dist
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equals_full_attention_model(seq, method, variant):
    _, results = seq
    for r, res in enumerate(results):
        got = res[(method, variant)]
        for key in ("logits", "loss", "grads"):
            assert got[key] < GRAD_TOL, f"rank {r}: {method} {variant} {key}: {got[key]:.1e}"


@pytest.mark.dist
@pytest.mark.parametrize("method", METHODS)
def test_training_steps_give_the_same_losses(seq, method):
    _, results = seq
    for r, res in enumerate(results):
        assert res[(method, "train")] < LOSS_RTOL, f"rank {r}"


@pytest.mark.dist
def test_bytes_communicated_per_method(seq):
    """Forward, per rank: what CommStats counted equals `sequence_parallel_bytes` (ring: N-1
    key+value chunks per layer; Ulysses: four all-to-alls keeping 1/N of a chunk each)."""
    world, results = seq
    shape = dict(seq_len=16, num_heads=8, num_kv_heads=4, head_dim=8, batch=2, dtype_bytes=4)
    L = 4
    ring = results[0][("ring", "llama")]["forward_bytes"]
    assert ring == {"ring_kv": L * sequence_parallel_bytes("ring", world, **shape)}
    ulysses = results[0][("ulysses", "llama")]["forward_bytes"]
    assert ulysses == {"all_to_all": round(L * sequence_parallel_bytes("ulysses", world, **shape))}
    # by hand, for world size 2: ring sends 1 chunk of k and of v; Ulysses half of q, k, v, out
    if world == 2:
        chunk = 2 * 8 * 8 * 4  # B * (T/N) * D * fp32 bytes, per head
        assert ring["ring_kv"] == L * 2 * 4 * chunk
        assert ulysses["all_to_all"] == L * (8 + 4 + 4 + 8) * chunk // 2


@pytest.mark.dist
def test_sequence_length_not_divisible_is_a_clear_error(seq):
    world, results = seq
    if 15 % world:
        assert "does not divide 15" in results[0]["bad_length"]
