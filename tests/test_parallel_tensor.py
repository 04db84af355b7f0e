"""Tensor parallelism against the unsharded model, on 2 and 4 gloo processes.

Tolerances (fp32; see minillm.parallel.testing): outputs and gradients within GRAD_TOL,
the losses of 3 AdamW steps within LOSS_RTOL relative.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minillm.generate import generate
from minillm.parallel import CommStats, spawn
from minillm.parallel.tensor import ColumnParallelLinear, RowParallelLinear
from minillm.parallel.tensor_model import (
    apply_tensor_parallel,
    check_tensor_parallel,
    shard_tensors,
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
    tiny_config,
    tiny_model,
)
from minillm.parallel.vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy

TOL = GRAD_TOL


def _layers(group) -> dict:
    """Column -> row parallel MLP, vocab-parallel embedding and loss, vs the plain layers."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(16, 32), nn.Linear(32, 12)
    col = ColumnParallelLinear.from_linear(fc1, group)
    row = RowParallelLinear.from_linear(fc2, group)
    x = torch.randn(3, 5, 16)
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = fc2(torch.relu(fc1(x_ref)))
    y_tp = row(torch.relu(col(x_tp)))
    (y_ref * torch.arange(12.0)).sum().backward()
    (y_tp * torch.arange(12.0)).sum().backward()
    out = {
        "mlp_out": max_abs_diff(y_tp, y_ref),
        "mlp_dx": max_abs_diff(x_tp.grad, x_ref.grad),
        "mlp_dw": max(
            max_abs_diff(col.weight.grad, col.shard(fc1.weight.grad)),
            max_abs_diff(col.bias.grad, col.shard(fc1.bias.grad)),
            max_abs_diff(row.weight.grad, row.shard(fc2.weight.grad)),
            max_abs_diff(row.bias.grad, fc2.bias.grad),
        ),
    }
    emb = nn.Embedding(64, 8)
    vemb = VocabParallelEmbedding.from_embedding(emb, group)
    ids = torch.randint(0, 64, (4, 7))
    out["embedding"] = max_abs_diff(vemb(ids), emb(ids))
    logits = torch.randn(20, 64, requires_grad=True)
    target = torch.randint(0, 64, (20,))
    shard = logits.detach().chunk(dist.get_world_size(group), dim=1)[dist.get_rank(group)]
    shard.requires_grad_()
    loss_tp = vocab_parallel_cross_entropy(shard, target, group)
    loss_ref = F.cross_entropy(logits, target, reduction="none")
    (loss_tp * torch.arange(20.0)).sum().backward()
    (loss_ref * torch.arange(20.0)).sum().backward()
    my_cols = logits.grad.chunk(dist.get_world_size(group), dim=1)[dist.get_rank(group)]
    out["vocab_ce"] = max_abs_diff(loss_tp, loss_ref)
    out["vocab_ce_grad"] = max_abs_diff(shard.grad, my_cols)
    return out


def _model(group, arch_overrides: dict) -> dict:
    """The whole CausalLM sharded: logits, loss, every gradient, training, generation."""
    ref = tiny_model(**arch_overrides)
    stats = CommStats()
    tp = apply_tensor_parallel(copy.deepcopy(ref), group, stats)
    ((ids, targets),) = random_batches(1, 2, 16, ref.config.vocab_size)
    logits_ref = ref(ids)
    lm_loss(logits_ref, targets).backward()
    calls_before = stats.calls["all_reduce"]
    logits_tp = tp(ids)  # gathered: (B, T, V) like the unsharded model
    forward_all_reduces = stats.calls["all_reduce"] - calls_before
    tp.lm_head.gather_output = False
    shard_logits = tp(ids)  # (B, T, V/p)
    loss = vocab_parallel_cross_entropy(shard_logits.flatten(0, 1), targets.flatten(), group)
    loss.mean().backward()
    expected = shard_tensors(tp, named_grads(ref))
    out = {
        "logits": max_abs_diff(logits_tp, logits_ref),
        "logits_shape_ok": shard_logits.shape[-1] * dist.get_world_size(group)
        == ref.config.vocab_size,
        "loss": abs(loss.mean().item() - lm_loss(logits_ref, targets).item()),
        "grads": max_abs_diff(named_grads(tp), expected),
        "forward_all_reduces": forward_all_reduces,
    }
    tp.lm_head.gather_output = True
    prompt = ids[0, :5]
    out["generate_equal"] = generate(tp, prompt, 6) == generate(ref, prompt, 6)
    return out


def _training(group) -> dict:
    ref, batches = tiny_model(), random_batches(3, 2, 16, 256)
    tp = apply_tensor_parallel(copy.deepcopy(ref), group)
    tp.lm_head.gather_output = False
    opt = torch.optim.AdamW(tp.parameters(), lr=1e-2)
    losses = []
    for ids, targets in batches:
        logits = tp(ids)
        loss = vocab_parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), group).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"train_losses": max_rel_diff(losses, reference_losses(ref, batches))}


def _bad_world_size(group) -> str:
    try:
        bad = tiny_model(num_attention_heads=6, num_key_value_heads=6, head_dim=8)
        apply_tensor_parallel(bad, group)
    except ValueError as e:
        return str(e)
    return "no error"


def tp_worker(group) -> dict:
    out = _layers(group)
    llama = _model(group, dict(qkv_bias=True, o_bias=True, mlp_bias=True))
    out.update({f"llama_{k}": v for k, v in llama.items()})
    qwen3 = _model(
        group,
        dict(architecture="Qwen3ForCausalLM", qk_norm=True, tie_word_embeddings=False),
    )
    out.update({f"qwen3_{k}": v for k, v in qwen3.items()})
    out.update(_training(group))
    out["bad_world_size"] = _bad_world_size(group) if dist.get_world_size(group) == 4 else ""
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def tp(request):
    results = spawn(tp_worker, request.param)
    return request.param, results


@pytest.mark.dist
def test_column_row_parallel_linear_match_nn_linear(tp):
    _, results = tp
    for r, res in enumerate(results):
        for key in ("mlp_out", "mlp_dx", "mlp_dw"):
            assert res[key] < TOL, f"rank {r}: {key} differs from nn.Linear by {res[key]:.2e}"


@pytest.mark.dist
def test_vocab_parallel_embedding_and_cross_entropy(tp):
    _, results = tp
    for r, res in enumerate(results):
        for key in ("embedding", "vocab_ce", "vocab_ce_grad"):
            assert res[key] < TOL, f"rank {r}: {key} differs from the unsharded op: {res[key]}"


@pytest.mark.dist
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sharded_model_outputs_and_gradients(tp, arch):
    _, results = tp
    for r, res in enumerate(results):
        assert res[f"{arch}_logits"] < TOL, f"rank {r}: logits differ"
        assert res[f"{arch}_logits_shape_ok"]
        assert res[f"{arch}_loss"] < TOL, f"rank {r}: vocab-parallel loss differs"
        assert res[f"{arch}_grads"] < TOL, f"rank {r}: gradients differ by {res[f'{arch}_grads']}"
        # one all-reduce per attention block and per MLP, one in the embedding
        assert res[f"{arch}_forward_all_reduces"] == 2 * tiny_config().num_hidden_layers + 1
        assert res[f"{arch}_generate_equal"], f"rank {r}: greedy tokens differ"


@pytest.mark.dist
def test_training_steps_give_the_same_losses(tp):
    _, results = tp
    for r, res in enumerate(results):
        rel = res["train_losses"]
        assert rel < LOSS_RTOL, f"rank {r}: losses differ by {rel:.1e} (relative)"


@pytest.mark.dist
def test_world_size_not_dividing_heads_is_a_clear_error_at_construction(tp):
    world, results = tp
    if world != 4:
        pytest.skip("checked at world size 4")
    msg = results[0]["bad_world_size"]
    assert "does not divide" in msg and "num_attention_heads=6" in msg and "[1, 2]" in msg


def test_check_tensor_parallel_lists_what_does_not_divide():
    with pytest.raises(ValueError, match="num_key_value_heads=4"):
        check_tensor_parallel(tiny_config(), 8)
    check_tensor_parallel(tiny_config(), 4)  # divides everything: no error


def test_tensor_parallel_shapes_of_llama_2_7b():
    from minillm.config import ModelConfig
    from minillm.parallel.tensor_model import tensor_parallel_shapes

    shapes = tensor_parallel_shapes(ModelConfig.from_name("llama-2-7b"), 2)
    assert shapes["q_proj"] == ((4096, 4096), (2048, 4096), 0)
    assert shapes["o_proj"] == ((4096, 4096), (4096, 2048), 1)
    assert shapes["down_proj"] == ((4096, 11008), (4096, 5504), 1)
    assert shapes["lm_head"][1] == (16000, 4096)
    with pytest.raises(ValueError, match="does not divide"):
        tensor_parallel_shapes(ModelConfig.from_name("llama-2-7b"), 3)


def test_per_rank_config_has_this_ranks_heads():
    from minillm.parallel.tensor_model import per_rank_config

    cfg = per_rank_config(tiny_config(), 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 8)
    assert cfg.hidden_size == tiny_config().hidden_size
