"""minillm agrees with transformers: logits and greedy tokens, every architecture."""

import pytest
import torch
from helpers import make_hf_model

import minillm
from minillm.bundled import BUNDLED_MODELS

SEQ = 40  # longer than Mistral's window of 16, so the window is exercised


def logit_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the logit scale (max |logit| of the reference)."""
    return float((a.float() - b.float()).abs().max() / a.float().abs().max())


def hf_greedy(hf, ids: torch.Tensor, n: int) -> list[int]:
    """transformers' greedy continuation, never stopping early. The explicit attention mask
    matters: without it generate() masks every token equal to pad_token_id."""
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert out.shape[1] == ids.shape[1] + n
    return out[0, ids.shape[1] :].tolist()


def test_logits_match_transformers(hf_checkpoint):
    arch, hf, path = hf_checkpoint
    model = minillm.load_model(path)
    ids = torch.randint(
        0, hf.config.vocab_size, (3, SEQ), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ref = hf(ids).logits
        for backend in ("sdpa", "naive"):
            model.attn_backend = backend
            assert logit_error(ref, model(ids)) <= 1e-4, f"{arch} {backend}"


def test_greedy_tokens_match_transformers(hf_checkpoint):
    arch, hf, path = hf_checkpoint
    model = minillm.load_model(path)
    prompt = torch.randint(
        0, hf.config.vocab_size, (7,), generator=torch.Generator().manual_seed(2)
    )
    ref = hf_greedy(hf, prompt[None], 32)
    assert minillm.generate(model, prompt, 32, stop_token_ids=[]) == ref, arch


def test_sliding_window_is_applied():
    """Without the window, Mistral's logits beyond the window would differ: the parity test
    above therefore checks the window, not just causal attention."""
    hf = make_hf_model("mistral", sliding_window=8)
    hf_full = make_hf_model("mistral", sliding_window=None)
    hf_full.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        windowed, full = hf(ids).logits, hf_full(ids).logits
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-5)
    assert not torch.allclose(windowed[:, 8:], full[:, 8:], atol=1e-3)


@pytest.mark.parametrize("tied", [True, False])
def test_saved_model_loads_in_transformers(tmp_path, tied):
    """save_model writes a folder transformers reads back to the same logits, sharded too."""
    import transformers

    config = minillm.ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = minillm.CausalLM(config).eval()
    minillm.save_model(model, tmp_path, max_shard_size=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        assert logit_error(hf(ids).logits, model(ids)) <= 1e-5
    back = minillm.load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_roundtrip_every_architecture(hf_checkpoint, tmp_path):
    """load -> save -> load by transformers keeps the architecture and the logits."""
    import transformers

    _arch, hf, path = hf_checkpoint
    minillm.save_model(minillm.load_model(path), tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again).__name__ == type(hf).__name__
    ids = torch.randint(0, hf.config.vocab_size, (1, SEQ))
    with torch.no_grad():
        assert logit_error(hf(ids).logits, again(ids).logits) <= 1e-5


@pytest.mark.parametrize("name", list(BUNDLED_MODELS))
def test_bundled_model_matches_transformers(name):
    import transformers

    path = minillm.bundled_model_path(name)
    model = minillm.load_model(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = minillm.load_tokenizer(name)
    prompt = tok.encode("import os\n\n\ndef walk(path):")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert logit_error(hf(ids).logits, model(ids)) <= 1e-4
    ref = hf_greedy(hf, ids, 32)
    assert minillm.generate(model, prompt, 32, stop_token_ids=[]) == ref


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_bf16_cuda_matches_transformers(arch, tmp_path):
    """bf16 on CUDA. bf16 keeps 8 significant bits, so both libraries are off from the fp32
    logits by ~1e-2 of the logit scale, with errors that depend on kernel order. The
    tolerance is relative to transformers' own error: ours may be at most 2x the error of
    transformers' bf16 against its fp32 (plus a floor of one bf16 ulp at the scale)."""
    hf = make_hf_model(
        arch,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1024,
        **({"head_dim": 64} if arch == "qwen3" else {}),
    )
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 1024, (4, 100), device="cuda")
    with torch.no_grad():
        ref32 = hf.cuda()(ids).logits.float()
        ref16 = hf.to(torch.bfloat16)(ids).logits.float()
        ours = minillm.load_model(tmp_path, dtype=torch.bfloat16, device="cuda")(ids).float()
    hf_err = logit_error(ref32, ref16)
    our_err = logit_error(ref32, ours)
    assert our_err <= 2 * hf_err + 2**-8, (our_err, hf_err)
