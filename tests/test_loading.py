"""Loading model folders: every bad input gets an error that says what is wrong."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minillm
from minillm import CheckpointError


@pytest.fixture
def folder(tmp_path):
    """A small Llama folder written by minillm, untied (so lm_head is stored)."""
    config = minillm.ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    minillm.save_model(minillm.CausalLM(config), tmp_path / "m")
    return tmp_path / "m"


def test_loads_back(folder):
    model = minillm.load_model(folder)
    assert model.config.num_hidden_layers == 2 and not model.training


def test_dtype_and_meta_free(folder):
    model = minillm.load_model(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())


def test_unsupported_architecture(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        minillm.load_model(folder)
    msg = str(e.value)
    assert "GPTNeoXForCausalLM" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in msg


def test_missing_and_unexpected_tensors_are_listed(folder):
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["lm_head.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        minillm.load_model(folder)
    msg = str(e.value)
    assert "missing tensors" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "lm_head.weight" in msg
    assert "unexpected tensors" in msg and "self_attn.extra.weight" in msg


def test_misshaped_tensor_is_named_with_both_shapes(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"k_proj.weight: \(32, 32\) in the checkpoint, \(16, 32\)"
    ):
        minillm.load_model(folder)


def test_truncated_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*model.safetensors"):
        minillm.load_model(folder)


def test_garbage_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot read"):
        minillm.load_model(folder)


def test_bad_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot read .*config\.json"):
        minillm.load_model(folder)


def test_unreadable_file(folder):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()  # exists but cannot be read as a file
    with pytest.raises(CheckpointError, match=r"config\.json"):
        minillm.load_model(folder)


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no model.safetensors .*pytorch_model.bin"):
        minillm.load_model(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        minillm.load_model(tmp_path / "nope")


def test_missing_shard(folder, tmp_path):
    model = minillm.load_model(folder)
    sharded = tmp_path / "sharded"
    minillm.save_model(model, sharded, max_shard_size="10KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    torch.testing.assert_close(
        minillm.load_model(sharded)(torch.tensor([[1, 2, 3]])), model(torch.tensor([[1, 2, 3]]))
    )
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"missing: .*{shards[1].name}"):
        minillm.load_model(sharded)


def test_resave_replaces_old_shards(folder, tmp_path):
    model = minillm.load_model(folder)
    out = tmp_path / "out"
    minillm.save_model(model, out, max_shard_size="10KB")
    minillm.save_model(model, out)  # now a single file: the old shards must not linger
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    shutil.rmtree(out)
