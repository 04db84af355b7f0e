"""The quantization benchmark scripts run end to end (--smoke: seconds, on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, out: Path, **env_extra: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), **env_extra}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    name = module.rsplit(".", 1)[1]
    assert (out / f"{name}.png").exists()
    return json.loads((out / f"{name}.json").read_text())


def test_w4a16_benchmark_smoke(tmp_path):
    data = _run("benchmarks.w4a16", tmp_path)
    assert data["environment"]["torch"] and data["copy_bandwidth_GBps"] > 0
    for row in data["rows"]:
        assert row["ours"]["max_rel_err"] < 1e-5  # fp32 in the interpreter
        assert row["naive"]["max_rel_err"] < 1e-5


def test_quality_benchmark_smoke(tmp_path):
    data = _run("benchmarks.quant_quality", tmp_path)
    rows = data["rows"]
    assert {"fp32", "RTN 4-bit", "GPTQ 4-bit", "AWQ 4-bit", "W8A8 percentile"} <= set(rows)
    assert rows["RTN 4-bit"]["linear_bits"] < 5 < rows["fp32"]["linear_bits"]
    assert "GPTQ 4-bit" in data["rtn_increase_cut"]


def test_gptq_validation_benchmark_smoke(tmp_path):
    # one thread: tiny ops on a shared 2-core machine are many times slower with two
    data = _run("benchmarks.gptq_validation", tmp_path, OMP_NUM_THREADS="1")
    assert data["split"] == "val" and len(data["rtn_increase_cut"]) == 2
    best = max(data["rtn_increase_cut"], key=lambda r: r["cut"])
    assert data["best"] == {k: best[k] for k in ("damp_percent", "calibration")}
