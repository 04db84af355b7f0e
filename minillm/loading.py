"""Load and save models in the Hugging Face folder layout.

A folder holds `config.json` and the weights as safetensors: one `model.safetensors`, or
shards `model-00001-of-0000N.safetensors` listed by `model.safetensors.index.json`
(tensor name -> shard file). Tensor names equal minillm's module names, so loading is:
check the names and shapes, then copy. With tied embeddings the checkpoint stores only
`model.embed_tokens.weight`; `lm_head.weight` is the same tensor.

Every failure names the file and what is wrong with it (`CheckpointError`), instead of a
traceback from deep inside torch or safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minillm.bundled import resolve_model_path
from minillm.config import ModelConfig
from minillm.model import CausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A model folder that cannot be loaded: the message says which file and why."""


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} not found in {path.parent}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _model_dir(name_or_path: str | Path) -> Path:
    path = resolve_model_path(name_or_path)
    if not path.exists():
        raise CheckpointError(f"no such model folder: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder (expected config.json + safetensors)")
    return path


def load_config(name_or_path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a bundled model name or a local Hugging Face folder."""
    path = _model_dir(name_or_path)
    try:
        return ModelConfig.from_hf_dict(_read_json(path / "config.json"))
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder, single-file or sharded."""
    if (path / INDEX_FILE).exists():
        index = _read_json(path / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path / INDEX_FILE} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"shards listed in {INDEX_FILE} are missing: {absent}")
        return files
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {others}: convert them to safetensors)" if others else ""
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")


def read_safetensors(files: Iterable[Path], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """All tensors of the files, cast to `dtype` (None keeps the stored dtype)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    t = f.get_tensor(name)
                    tensors[name] = t if dtype is None else t.to(dtype)
        except Exception as e:  # safetensors raises its own error types and OSError
            raise CheckpointError(f"cannot read {file}: {e}") from None
    return tensors


def _match_state_dict(
    model: CausalLM, tensors: dict[str, torch.Tensor], where: Path
) -> dict[str, torch.Tensor]:
    """Check names and shapes against the model; return the state dict to assign."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    if tied:
        tensors.pop("lm_head.weight", None)
        if "model.embed_tokens.weight" in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(
        f"{k}: {tuple(tensors[k].shape)} in the checkpoint, {expected[k]} expected"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {misshaped}")
    if problems:
        raise CheckpointError(
            f"the weights in {where} do not match its config.json:\n  " + "\n  ".join(problems)
        )
    return tensors


def load_model(
    name_or_path: str | Path = "minillm-tiny",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_backend: str = "sdpa",
) -> CausalLM:
    """Load a bundled model by name, or a local Hugging Face folder, in eval mode."""
    path = _model_dir(name_or_path)
    config = load_config(path)
    tensors = read_safetensors(weight_files(path), dtype)
    with torch.device("meta"):  # shapes only: no time spent on a random init
        model = CausalLM(config, attn_backend=attn_backend)
    state = _match_state_dict(model, tensors, path)
    state = {k: v.to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    s = size.strip().upper()
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_model(
    model: CausalLM,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    tokenizer=None,
) -> Path:
    """Write `model` as a Hugging Face folder (loadable by minillm and by `transformers`).

    dtype: cast the weights before writing (None keeps the model's dtype).
    max_shard_size: split the weights into shards of at most this many bytes ("2GB").
    tokenizer: a `minillm.Tokenizer` whose files are saved beside the weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {}
    for name, t in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # stored once, as model.embed_tokens.weight
        t = t.detach().to("cpu", dtype or t.dtype).contiguous()
        state[name] = t
    stored_dtype = next(iter(state.values())).dtype

    hf = config.to_hf_dict()
    hf["dtype"] = str(stored_dtype).removeprefix("torch.")
    hf["torch_dtype"] = hf["dtype"]
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    for old in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        old.unlink(missing_ok=True)
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path)
    return path
