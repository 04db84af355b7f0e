"""The parallelism benchmarks run end to end in --smoke mode (tiny model, 2 gloo ranks).

The GPU runs (NCCL, 2 GPUs) are `torchrun --standalone --nproc_per_node=2 -m
benchmarks.tp_decode` and `... -m benchmarks.zero_memory`; these tests check the scripts,
their numbers' bookkeeping and the result files, not the speed.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the repository, not installed

from benchmarks import tp_decode, zero_memory  # noqa: E402


@pytest.mark.dist
def test_tp_decode_smoke(tmp_path):
    tp_decode.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "tp_decode.json").read_text())
    assert (tmp_path / "tp_decode.png").stat().st_size > 0
    rows = data["rows"]
    steps = ["T=1", "T=8"] + (["cache S=8"] if tp_decode.StaticKVCache is not None else [])
    assert {(r["workload"], r["ranks"]) for r in rows} == {(s, p) for s in steps for p in (1, 2)}
    for r in rows:
        assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(1 / r["seconds"])
        if r["ranks"] == 2:  # fp32 on CPU: the sharded model gives the same logits
            assert r["max_logit_diff"] < 1e-4 and r["same_greedy_token"]
            assert "speedup_vs_1_gpu" in r
    assert data["headline"]["target"] == 1.5


@pytest.mark.dist
def test_zero_memory_smoke(tmp_path):
    zero_memory.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "zero_memory.json").read_text())
    assert (tmp_path / "zero_memory.png").stat().st_size > 0
    assert [(r["stage"], r["offload"]) for r in data["rows"]] == zero_memory.SETUPS
    for r in data["rows"]:  # bf16 parameters, fp32 Adam: the paper's 2 + 2 + 12
        assert r["device_tensor_bytes_over_formula"] == pytest.approx(1.0, abs=0.10)
    assert data["summary"]["met"]


def _torchrun(module: str, out: Path) -> None:
    import os
    import subprocess

    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", module, "--smoke", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=300)


@pytest.mark.gpu
def test_tp_decode_smoke_on_two_gpus_with_nccl(tmp_path):
    """The NCCL path: eager and CUDA-graph decode steps of the sharded tiny model."""
    _torchrun("benchmarks.tp_decode", tmp_path)
    rows = json.loads((tmp_path / "tp_decode.json").read_text())["rows"]
    assert {r["mode"] for r in rows} == {"eager", "graph"}
    for r in rows:
        assert isinstance(r["seconds"], float), r["seconds"]  # no failed capture
        if r["ranks"] == 2:
            assert r["max_logit_diff"] < 1e-3 and r["same_greedy_token"]


@pytest.mark.gpu
def test_zero_memory_smoke_on_two_gpus_with_nccl(tmp_path):
    _torchrun("benchmarks.zero_memory", tmp_path)
    data = json.loads((tmp_path / "zero_memory.json").read_text())
    assert all("cuda_allocated_at_rest" in r for r in data["rows"])
    for r in data["rows"]:  # the tensors a rank holds: exactly the formula, on GPU too
        assert r["device_tensor_bytes_over_formula"] == pytest.approx(1.0, abs=0.10)
