"""A minillm model to a .gguf file that llama.cpp runs, and a .gguf file back to minillm.

Export writes, through the `gguf` package, the `llama` architecture: metadata keys
(`llama.embedding_length`, `llama.attention.head_count_kv`, ...), the byte-level BPE
tokenizer (`tokenizer.ggml.model = "gpt2"`: tokens, merges, special ids), and every
tensor in the GGML type that the file type's mixture gives it (`gguf.choose_type`).

One subtlety: Hugging Face Llama checkpoints rotate the two halves of each head
(`rotate_half`), llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ... So
llama.cpp's converter permutes the rows of q_proj and k_proj inside each head,

    row (h, half, i)  ->  row (h, i, half)          h head, half in {0, 1}, i < D/2

which turns one rotation into the other; attention scores are unchanged. We permute
on export and undo it on import. GGUF blocks never cross rows, so the permutation
applies to quantized rows too, byte for byte.

Import rebuilds the `ModelConfig` from the metadata and either dequantizes every
tensor on load (a plain float model) or keeps the linear layers' blocks in
`GGUFLinear` modules that dequantize on the fly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from minillm.config import ModelConfig, RopeScaling
from minillm.model import CausalLM
from minillm.quant.base import set_module
from minillm.quant.gguf import FTYPES, GGUFLinear, GGUFQuantizer, gguf_name, minillm_name
from minillm.quant.gguf_file import GGUFFile, GGUFFormatError, read_gguf

ARCH = "llama"


def permute_rows(w: np.ndarray, n_heads: int, inverse: bool = False) -> np.ndarray:
    """llama.cpp's q/k row order: (H, 2, D/2, ...) -> (H, D/2, 2, ...); `inverse` undoes it."""
    half = w.shape[0] // n_heads // 2
    split = (n_heads, half, 2) if inverse else (n_heads, 2, half)
    return np.ascontiguousarray(w.reshape(*split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _permute_qk(name: str, shape: tuple, raw: np.ndarray, config: ModelConfig, inverse: bool):
    """Rows of q_proj / k_proj (weights or biases) in llama.cpp's order, or back."""
    heads = _heads_of(name, config)
    if heads is None:
        return raw
    rows = raw.reshape(shape[0], -1)  # (out_features, bytes per row): blocks never cross rows
    return permute_rows(rows, heads, inverse).reshape(raw.shape)


def _heads_of(name: str, config: ModelConfig) -> int | None:
    if ".self_attn.q_proj." in name:
        return config.num_attention_heads
    if ".self_attn.k_proj." in name:
        return config.num_key_value_heads
    return None


def _check_exportable(config: ModelConfig) -> None:
    problems = []
    if config.qk_norm:
        problems.append("q/k norms (Qwen3)")
    if config.sliding_window is not None:
        problems.append("a sliding attention window")
    if config.rope_scaling.rope_type not in ("default", "linear"):
        problems.append(f"rope scaling {config.rope_scaling.rope_type!r}")
    if problems:
        raise ValueError(
            f"GGUF export writes the plain llama architecture; this model has {', '.join(problems)}"
        )


def _tokenizer_metadata(writer, tokenizer) -> None:
    """tokenizer.ggml.*: the GPT-2 style byte-level BPE of the bundled models."""
    path = Path(tokenizer.path) / "tokenizer.json"
    spec = json.loads(path.read_text()) if path.exists() else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ValueError(
            f"GGUF export supports byte-level BPE tokenizers (tokenizer.json), not {tokenizer.path}"
        )
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
        writer.add_add_bos_token(True)  # our template puts BOS in front of every text
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_eos_token(False)


def export_gguf(
    model: CausalLM,
    path: str | Path,
    ftype: str = "F16",
    tokenizer=None,
    name: str = "minillm",
    search: bool = True,
) -> Path:
    """Write `model` as a llama-architecture .gguf file of file type `ftype`
    (F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, Q4_K_M, Q5_K_M, Q6_K)."""
    import gguf

    config = model.config
    _check_exportable(config)
    tensors = GGUFQuantizer(ftype, search=search).quantize(model, progress=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    writer.add_file_type(FTYPES[ftype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_scaling.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling.factor)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer is not None:
        _tokenizer_metadata(writer, tokenizer)
    for mname, t in tensors.items():
        raw = _permute_qk(mname, t.shape, t.raw, config, inverse=False)
        writer.add_tensor(gguf_name(mname), raw, raw_dtype=t.qtype.value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """The ModelConfig that the llama metadata of a GGUF file describes."""
    md = f.metadata
    arch = md.get("general.architecture")
    if arch != ARCH:
        raise GGUFFormatError(f"general.architecture is {arch!r}; minillm reads {ARCH!r} files")

    def need(key: str):
        if f"{ARCH}.{key}" not in md:
            raise GGUFFormatError(f"the metadata lacks {ARCH}.{key}")
        return md[f"{ARCH}.{key}"]

    embd = f.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise GGUFFormatError("the file has no 2-D token_embd.weight tensor")
    layers = {int(m.group(1)) for n in f.tensors if (m := re.match(r"blk\.(\d+)\.", n))}
    try:
        hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
        scaling = RopeScaling()
        if md.get(f"{ARCH}.rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", float(md[f"{ARCH}.rope.scaling.factor"]))
        config = ModelConfig(
            vocab_size=embd.shape[0],
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_hidden_layers=int(need("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(md.get(f"{ARCH}.attention.head_count_kv", heads)),
            head_dim=int(md.get(f"{ARCH}.attention.key_length", hidden // max(heads, 1))),
            max_position_embeddings=int(need("context_length")),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(md.get(f"{ARCH}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in f.tensors,
            qkv_bias="blk.0.attn_q.bias" in f.tensors,
            o_bias="blk.0.attn_output.bias" in f.tensors,
            mlp_bias="blk.0.ffn_up.bias" in f.tensors,
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        )
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise GGUFFormatError(f"the llama metadata does not describe a valid model: {e}") from None
    # the metadata must agree with the tensors before any module is built from it
    n = config.num_hidden_layers
    if len(layers) != n or max(layers, default=-1) != n - 1:  # i.e. layers == {0, ..., n-1}
        raise GGUFFormatError(
            f"{ARCH}.block_count is {config.num_hidden_layers}, but the file has tensors for "
            f"{len(layers)} layers"
        )
    if embd.shape[1] != config.hidden_size:
        raise GGUFFormatError(
            f"token_embd.weight has rows of {embd.shape[1]}, {ARCH}.embedding_length is "
            f"{config.hidden_size}"
        )
    return config


def load_gguf(
    path: str | Path | GGUFFile, on_the_fly: bool = False, dtype: torch.dtype = torch.float32
) -> CausalLM:
    """A minillm model from a llama .gguf file, in eval mode on the CPU.

    on_the_fly=False dequantizes every tensor on load; True keeps each linear layer's
    blocks in a `GGUFLinear` (less memory, dequantized at every forward)."""
    f = path if isinstance(path, GGUFFile) else read_gguf(path)
    config = config_from_gguf(f)
    with torch.device("meta"):
        model = CausalLM(config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for gname, t in f.tensors.items():
        name = minillm_name(gname)
        if name not in expected:
            raise GGUFFormatError(f"tensor {gname!r} has no place in a {config.architecture}")
        if tuple(expected[name].shape) != t.shape:
            raise GGUFFormatError(
                f"tensor {gname!r} has shape {t.shape}, the metadata implies "
                f"{tuple(expected[name].shape)}"
            )
        raw = _permute_qk(name, t.shape, t.raw, config, inverse=True)
        module_name, _, kind = name.rpartition(".")
        module = model.get_submodule(module_name)
        if on_the_fly and kind == "weight" and isinstance(module, torch.nn.Linear):
            bias = f.tensors.get(gname.replace(".weight", ".bias"))
            linear = GGUFLinear(t.qtype, torch.from_numpy(raw.copy()), module.in_features)
            set_module(model, module_name, linear)
            if bias is not None:
                linear.bias = torch.nn.Parameter(bias.dequantize().to(dtype), requires_grad=False)
            state[f"{module_name}.raw"] = linear.raw
            continue
        state[name] = type(t)(t.qtype, t.shape, raw).dequantize().to(dtype)
    expected = set(model.state_dict()) - (
        {"lm_head.weight"} if config.tie_word_embeddings else set()
    )
    missing = sorted(n for n in expected - set(state) if not n.endswith(".raw"))
    if missing:
        names = ", ".join(gguf_name(n) for n in missing[:5])
        raise GGUFFormatError(
            f"the file lacks tensors: {names}{' ...' if len(missing) > 5 else ''}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
