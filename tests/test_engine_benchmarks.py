"""The engine benchmarks run end to end in their --smoke mode (tiny models, CPU, seconds),
through `minillm bench` too, and write their JSON and plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize(
    "name, result",
    [
        ("engine_decode", "engine_decode_smoke"),
        ("engine_throughput", "engine_throughput_cpu_smoke"),
        ("engine_chunked", "engine_chunked_smoke"),
        ("engine_speculative", "engine_speculative_cpu_smoke"),
    ],
)
def test_benchmark_smoke(tmp_path, name, result):
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / f"{result}.json").read_text())
    assert (tmp_path / f"{result}.png").stat().st_size > 1000
    assert data["environment"]["torch"] and data["rows"]
    assert not [r for r in data["rows"] if "error" in r], "a benchmark variant failed"
    assert data["headline"] is not None


def test_minillm_bench_runs_the_benchmarks(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "minillm", "bench", "engine_chunked", "--smoke", "--out",
         str(tmp_path)],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "engine_chunked_smoke.json").exists()
    bad = subprocess.run([sys.executable, "-m", "minillm", "bench", "nope"], env=ENV,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr


def test_decode_profile_smoke(tmp_path):
    """The per-kernel profile of batch-1 decoding: its rows, sorted, add up to the total it
    reports, every row was launched, and the matmuls are among them."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine_decode_profile", "--smoke", "--out",
         str(tmp_path)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "engine_decode_profile_smoke.json").read_text())
    assert (tmp_path / "engine_decode_profile_smoke.png").stat().st_size > 1000
    rows = data["rows"]
    assert rows and all(r["us_per_token"] > 0 and r["launches_per_token"] > 0 for r in rows)
    assert [r["us_per_token"] for r in rows] == sorted((r["us_per_token"] for r in rows),
                                                       reverse=True)  # fmt: skip
    total = sum(r["us_per_token"] for r in rows)
    assert total == pytest.approx(data["kernel_us_per_token"], rel=1e-9)
    assert any(r["kernel"] == "aten::mm" or "linear" in r["kernel"] for r in rows)
    assert data["tokens_per_s"] > 0 and data["wall_us_per_token"] > 0


def test_host_cost_smoke_rounds(tmp_path):
    """The host-cost benchmark's speculative variants run the round they name: the
    one-wait round on the device, or the round that waits twice (no device rounds)."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine_host_cost", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "engine_host_cost_cpu_smoke.json").read_text())["rows"]
    assert (tmp_path / "engine_host_cost_cpu_smoke.png").stat().st_size > 1000
    assert [r["variant"] for r in rows] == ["plain", "round k=2", "two waits k=2"]
    assert rows[1]["device_rounds"] > 0 and rows[2]["device_rounds"] == 0
    assert all(r["us_per_step"] > 0 and r["us_per_token"] > 0 for r in rows)
