"""The benchmark scripts of GGUF, NF4 and QLoRA run (their --smoke versions)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """A benchmark script as a module, without putting the repository root on sys.path."""
    spec = importlib.util.spec_from_file_location(f"benchmarks.{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gguf_perplexity, nf4_dequant, qlora_finetune = (
    load(n) for n in ("gguf_perplexity", "nf4_dequant", "qlora_finetune")
)


def test_gguf_perplexity_smoke(tmp_path):
    gguf_perplexity.main(["--smoke", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "gguf_perplexity_smoke.json").read_text())
    by = {r["config"]: r for r in data["rows"]}
    assert by["Q8_0"]["bits_per_weight"] == 8.5 and by["F16"]["ratio_to_f16"] == 1.0
    assert 4.1 < by["NF4"]["bits_per_weight"] < 4.2
    assert (tmp_path / "gguf_perplexity_smoke.png").stat().st_size > 0


def test_qlora_finetune_smoke(tmp_path):
    qlora_finetune.main(["--smoke", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "qlora_finetune_smoke.json").read_text())
    assert len(data["losses"]) == 2 and data["memory_65b_gb"]["qlora"] < 48


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_nf4_dequant_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    nf4_dequant.main(["--smoke", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "nf4_dequant_smoke.json").read_text())
    assert data["rows"][0]["triton_gbps"] > 0
