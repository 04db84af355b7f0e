"""QLoRA: LoRA adapters on an NF4 base, merging, the task, the memory arithmetic."""

import pytest
import torch
from torch import nn

import minillm
from minillm.quant.nf4 import NF4Linear, NF4Quantizer, NF4Tensor
from minillm.quant.qlora import (
    LlamaShape,
    LoRALinear,
    add_lora,
    finetune_memory,
    merge_lora,
)
from minillm.quant.qlora_task import (
    HELDOUT_CLASSES,
    HELDOUT_FIELDS,
    TRAIN_CLASSES,
    TRAIN_FIELDS,
    completion_loss,
    encode_batch,
    make_split,
    train_adapters,
)


@pytest.mark.parametrize("nf4", [False, True])
def test_lora_starts_at_the_base_and_merges_exactly(nf4):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    base = NF4Linear(NF4Tensor.from_weight(linear.weight), linear.bias) if nf4 else linear
    lora = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(lora(x), base(x))  # B = 0: no change yet
    with torch.no_grad():
        lora.lora_B.normal_()
    want = base(x) + 2.0 * (x @ lora.lora_A.t() @ lora.lora_B.t())  # alpha / r = 2
    torch.testing.assert_close(lora(x), want)
    torch.testing.assert_close(lora.merged()(x), lora(x), rtol=1e-5, atol=1e-5)


def test_only_the_adapters_get_gradients():
    model = NF4Quantizer().apply(minillm.load_model("minillm-tiny-draft"), progress=False)
    params = add_lora(model, r=4)
    cfg = model.config
    C, F, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    per_layer = 4 * ((C + C) * 2 + (C + kv) * 2 + (C + F) * 3)
    assert sum(p.numel() for p in params) == cfg.num_hidden_layers * per_layer
    model(torch.tensor([[0, 1, 2, 3]])).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_short_finetune_lowers_the_loss_and_keeps_the_base_frozen():
    tok = minillm.load_tokenizer()
    model = NF4Quantizer().apply(minillm.load_model("minillm-tiny-draft"), progress=False)
    base_codes = model.model.layers[0].mlp.up_proj.packed.clone()
    torch.manual_seed(0)  # the adapters' init
    params = add_lora(model, r=8, alpha=16)
    ids, mask = encode_batch(tok, make_split("heldout", 8, seed=1))
    with torch.no_grad():
        before = float(completion_loss(model, ids, mask))
    losses = train_adapters(model, tok, params, steps=12, batch_size=4, lr=3e-3, progress=False)
    with torch.no_grad():
        after = float(completion_loss(model, ids, mask))
    assert len(losses) == 12 and after < 0.8 * before, (before, after, losses)
    assert torch.equal(model.model.layers[0].mlp.up_proj.base.packed, base_codes)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        assert float(completion_loss(merged, ids, mask)) == pytest.approx(after, rel=1e-4)


def test_task_examples_are_valid_python_and_splits_are_disjoint():
    train, held = make_split("train", 50), make_split("heldout", 50)
    assert make_split("train", 50) == train  # seeded
    assert not set(TRAIN_CLASSES) & set(HELDOUT_CLASSES)
    assert not set(TRAIN_FIELDS) & set(HELDOUT_FIELDS)
    for ex in train[:5] + held[:5]:
        scope: dict = {}
        exec(ex.prompt + ex.target, scope)  # the completed class runs
        cls_name = ex.prompt.split()[1].rstrip(":")
        n_args = ex.prompt.split("\n")[1].count(",")
        obj = scope[cls_name](*range(n_args))
        assert repr(obj).startswith(f"{cls_name}(") and repr(obj).endswith(")")
    tok = minillm.load_tokenizer()
    ids, mask = encode_batch(tok, held[:3])
    for row, m, ex in zip(ids, mask, held[:3], strict=True):
        assert tok.decode(row[m.bool()].tolist()) == ex.target


def test_memory_calculator_reproduces_65b_in_48gb():
    shape = LlamaShape()  # LLaMA-65B
    assert 65.0e9 < shape.params < 65.5e9
    full, lora, qlora = (finetune_memory(m, shape, r=64) for m in ("full", "lora", "qlora"))
    assert full.total_gb > 780  # "more than 780 GB" for 16-bit fine-tuning
    assert qlora.total_gb < 48 < lora.total_gb < full.total_gb
    assert qlora.gb["base weights (NF4 + DQ)"] == pytest.approx(34.5, abs=0.5)
    with pytest.raises(ValueError, match="method"):
        finetune_memory("int8")
