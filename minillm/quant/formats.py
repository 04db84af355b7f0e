"""Pre-quantized checkpoints: the folder layouts of published GPTQ and AWQ models.

Both are Hugging Face folders (`config.json` + `model.safetensors`, see
`minillm.loading`) in which each quantized linear layer `<name>` is stored as packed
integer tensors instead of `<name>.weight`, and `config.json` carries a
`quantization_config`. Everything else (embeddings, norms, the head) stays float16.

GPTQ (AutoGPTQ, GPTQModel; read by transformers, vLLM, TGI), quant_method "gptq":
    <name>.qweight  int32 (K * bits / 32, N)  codes packed along the input dim K
    <name>.qzeros   int32 (G, N * bits / 32)  zero points packed along the output dim N
    <name>.scales   fp16  (G, N)
    <name>.g_idx    int32 (K,)                group of each input feature (act-order)
    <name>.bias     fp16  (N,)                if the layer has one
    quantization_config: {"quant_method": "gptq", "bits", "group_size", "desc_act", "sym",
                          "damp_percent", "true_sequential", "static_groups",
                          "checkpoint_format": "gptq", "pack_dtype": "int32"}
  Zero-point convention: checkpoint_format "gptq" (v1, what the published checkpoints use)
  stores zero - 1 (so a symmetric 4-bit layer's qzeros words read 0x77777777) and loaders
  add 1 back; "gptq_v2" (GPTQModel's internal format) stores the zero itself. minillm
  writes either and reads both, computing the offset modulo 2^bits per code: a zero
  of 0 (a group with no negative weight, asymmetric only) is stored as 2^bits - 1,
  which minillm reads back exactly (loaders that add 1 without wrapping do not).
  Packing: a little-endian bit stream (`minillm.quant.packing`).

AWQ (AutoAWQ "GEMM" version; read by transformers, vLLM), quant_method "awq", 4 bits:
    <name>.qweight  int32 (K, N / 8)   8 output columns per word, AWQ's nibble order
    <name>.qzeros   int32 (G, N / 8)   the zeros themselves, same packing
    <name>.scales   fp16  (G, N)
    quantization_config: {"quant_method": "awq", "bits": 4, "group_size", "zero_point": true,
                          "version": "gemm", "modules_to_not_convert": null}
  AWQ has no act-order: groups are always k // group_size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minillm.loading import (
    SINGLE_FILE,
    CheckpointError,
    _match_state_dict,
    _model_dir,
    _read_json,
    load_config,
    read_safetensors,
    weight_files,
)
from minillm.model import CausalLM
from minillm.quant.base import set_module
from minillm.quant.linear import QuantLinear
from minillm.quant.packing import (
    pack_awq,
    pack_cols,
    pack_rows,
    unpack_awq,
    unpack_cols,
    unpack_rows,
)
from minillm.quant.rtn import QuantParams

QUANT_METHODS = ("gptq", "awq")
GPTQ_FORMATS = ("gptq", "gptq_v2")
_STORED = ("qweight", "qzeros", "scales", "g_idx")


def to_checkpoint(
    m: QuantLinear, quant_method: str, checkpoint_format: str = "gptq"
) -> dict[str, torch.Tensor]:
    """The tensors (without the layer-name prefix) a `quant_method` checkpoint stores for `m`."""
    p = m.params()  # codes (N, K) in original feature order
    out: dict[str, torch.Tensor] = {"scales": p.scales.t().contiguous().half()}  # (G, N)
    zeros = p.zeros.round().to(torch.int32).t().contiguous()  # (G, N)
    if quant_method == "gptq":
        if checkpoint_format not in GPTQ_FORMATS:
            raise ValueError(
                f"checkpoint_format must be one of {GPTQ_FORMATS}, got {checkpoint_format!r}"
            )
        if checkpoint_format == "gptq":
            zeros = (zeros - 1) % 2**m.bits  # v1: zero - 1
        out["qweight"] = pack_rows(p.qweight.t().contiguous(), m.bits)  # (K*bits/32, N)
        out["qzeros"] = pack_cols(zeros, m.bits)  # (G, N*bits/32)
        out["g_idx"] = p.g_idx.to(torch.int32)
    elif quant_method == "awq":
        if m.bits != 4 or m.act_order:
            raise ValueError(f"the AWQ layout holds 4-bit layers without act-order; {m} is not")
        out["qweight"] = pack_awq(p.qweight.t().contiguous())  # (K, N/8)
        out["qzeros"] = pack_awq(zeros)  # (G, N/8)
    else:
        raise ValueError(f"unknown quant_method {quant_method!r}; supported: {QUANT_METHODS}")
    if m.bias is not None:
        out["bias"] = m.bias.half()
    return out


def from_checkpoint(
    tensors: dict[str, torch.Tensor], qc: dict[str, Any], in_features: int, out_features: int
) -> QuantLinear:
    """A `QuantLinear` from one layer's stored tensors and the folder's quantization_config."""
    method, bits = qc["quant_method"], qc["bits"]
    K, N = in_features, out_features
    G = K if qc["group_size"] in (-1, 0, None) else qc["group_size"]
    if method == "gptq":
        codes = unpack_rows(tensors["qweight"], bits).t()  # (N, K)
        zeros = unpack_cols(tensors["qzeros"], bits)[:, :N]  # (G, N)
        if qc.get("checkpoint_format", "gptq") == "gptq":
            zeros = (zeros + 1) % 2**bits
        g_idx = tensors.get("g_idx")
        g_idx = torch.arange(K, dtype=torch.int32) // G if g_idx is None else g_idx.to(torch.int32)
    else:  # awq
        codes = unpack_awq(tensors["qweight"]).t()  # (N, K)
        zeros = unpack_awq(tensors["qzeros"])  # (G, N)
        g_idx = torch.arange(K, dtype=torch.int32) // G
    if tuple(codes.shape) != (N, K):
        raise CheckpointError(f"qweight unpacks to {tuple(codes.shape)[::-1]}, expected ({K}, {N})")
    p = QuantParams(codes, tensors["scales"].float().t(), zeros.float().t(), g_idx, bits, G)
    return QuantLinear.from_params(p, tensors.get("bias"))


def quantization_config(method: str, bits: int, group_size: int, **settings: Any) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for `method`."""
    if method == "gptq":
        return {
            "quant_method": "gptq", "bits": bits, "group_size": group_size,
            "desc_act": bool(settings.get("desc_act", False)),
            "sym": bool(settings.get("sym", False)),
            "damp_percent": settings.get("damp_percent", 0.01), "true_sequential": True,
            "static_groups": False, "checkpoint_format": settings.get("checkpoint_format", "gptq"),
            "pack_dtype": "int32", "lm_head": False,
        }  # fmt: skip
    if method == "awq":
        return {
            "quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None,
        }  # fmt: skip
    raise ValueError(f"unknown quant_method {method!r}; supported: {QUANT_METHODS}")


def save_quantized(
    model: CausalLM,
    path: str | Path,
    quant_method: str = "gptq",
    *,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float16,
    tokenizer=None,
) -> Path:
    """Write a converted model (its linear layers are `QuantLinear`s) as a `quant_method`
    folder; the float tensors are cast to `dtype`."""
    if quant_method not in QUANT_METHODS:
        raise ValueError(f"unknown quant_method {quant_method!r}; supported: {QUANT_METHODS}")
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not qlayers:
        raise ValueError("the model has no QuantLinear layers: quantize and convert it first")
    bits_set = {m.bits for m in qlayers.values()}
    sizes = {-1 if m.group_size == m.in_features else m.group_size for m in qlayers.values()}
    if len(bits_set) != 1 or len(sizes) != 1:
        raise ValueError(
            f"one folder holds one bits and one group_size; the layers use "
            f"bits {sorted(bits_set)}, "
            f"group sizes {sorted(sizes)}"
        )
    bits, group_size = bits_set.pop(), sizes.pop()
    settings = dict(getattr(model, "quantization_config", {}))
    settings["desc_act"] = any(m.act_order for m in qlayers.values())
    settings["checkpoint_format"] = checkpoint_format
    for k in ("bits", "group_size", "method", "quant_method"):
        settings.pop(k, None)
    qc = quantization_config(quant_method, bits, group_size, **settings)

    tensors: dict[str, torch.Tensor] = {}
    for name, m in qlayers.items():
        for k, v in to_checkpoint(m, quant_method, checkpoint_format).items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
    skip = {f"{n}.{b}" for n in qlayers for b, _ in qlayers[n].named_buffers()}
    for name, t in model.state_dict().items():
        if name in skip or (model.config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        tensors[name] = t.detach().to("cpu", dtype).contiguous()

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf_dict()
    hf["dtype"] = hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if quant_method == "gptq":  # AutoGPTQ reads its settings from this file too
        (path / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def _check_quant_config(qc: Any, where: Path) -> dict[str, Any]:
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object")
    method = qc.get("quant_method")
    if method not in QUANT_METHODS:
        raise CheckpointError(
            f"{where}: unknown quantization method {method!r}; minillm loads {list(QUANT_METHODS)}"
        )
    bits, allowed = qc.get("bits", qc.get("w_bit")), (4,) if method == "awq" else (2, 3, 4, 8)
    if bits not in allowed:
        raise CheckpointError(
            f"{where}: {method} with bits={bits} is not supported; allowed {allowed}"
        )
    fmt = qc.get("checkpoint_format", "gptq")
    if method == "gptq" and fmt not in GPTQ_FORMATS:
        raise CheckpointError(
            f"{where}: checkpoint_format {fmt!r} not supported; allowed {GPTQ_FORMATS}"
        )
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise CheckpointError(
            f"{where}: AWQ version {qc.get('version')!r}: only 'gemm' is supported"
        )
    if method == "awq" and not qc.get("zero_point", True):
        raise CheckpointError(f"{where}: AWQ without zero points is not supported")
    group_size = qc.get("group_size", qc.get("q_group_size", -1))
    return {**qc, "bits": bits, "group_size": group_size}


def load_quantized(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> CausalLM:
    """Load a GPTQ or AWQ folder into a `CausalLM` whose quantized layers are `QuantLinear`s."""
    path = _model_dir(name_or_path)
    hf = _read_json(path / "config.json")
    if "quantization_config" not in hf:
        raise CheckpointError(
            f"{path / 'config.json'} has no quantization_config: use minillm.load_model"
        )
    qc = _check_quant_config(hf["quantization_config"], path / "config.json")
    config = load_config(path)
    tensors = read_safetensors(weight_files(path), None)
    names = sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))
    with torch.device("meta"):
        model = CausalLM(config)
    state: dict[str, torch.Tensor] = {}
    for name in names:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{path}: quantized layer {name!r} is not part of the model"
            ) from None
        layer = {
            k: tensors.pop(f"{name}.{k}") for k in (*_STORED, "bias") if f"{name}.{k}" in tensors
        }
        missing = {"qweight", "qzeros", "scales"} - set(layer)
        if missing:
            raise CheckpointError(f"{path}: layer {name} lacks {sorted(missing)}")
        try:
            q = from_checkpoint(layer, qc, linear.in_features, linear.out_features)
        except ValueError as e:
            raise CheckpointError(f"{path}: layer {name}: {e}") from None
        with torch.device("meta"):
            set_module(
                model,
                name,
                QuantLinear(
                    q.in_features, q.out_features, q.bits, q.group_size, q.bias is not None
                ),
            )
        state.update({f"{name}.{k}": v for k, v in q.state_dict().items()})
    floats = {k: v.to(dtype) for k, v in tensors.items()}
    state = {**_match_state_dict(model, {**floats, **state}, path)}
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.refresh()
    model.quantization_config = qc
    return model.eval()
