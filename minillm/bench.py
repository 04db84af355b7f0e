"""Benchmark plumbing shared by every script in `benchmarks/`: timing, environment, results.

A speed claim in minillm is a benchmark that measures the fast path and its baseline in
the same run, and reports their ratio and the fraction of the hardware limit (GB/s,
TFLOP/s, tokens/s). This module times code correctly on CPU and GPU, records the
environment, and writes each result as JSON (plus the plot the script draws) into
`benchmarks/results/`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Device name, versions and date: what a result needs to be compared with another."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = props.name
        env["device_count"] = torch.cuda.device_count()
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, " + (
            f"{torch.get_num_threads()} threads)"
        )
    return env


def time_fn(
    fn: Callable[[], Any], warmup: int = 3, repeat: int = 10, device: str | None = None
) -> float:
    """Median seconds of one call of `fn`, after `warmup` calls.

    On CUDA each call is timed with CUDA events (the GPU's own clock), so asynchronous
    launches are measured to their end."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_cuda_graph(
    fns: list[Callable[[], Any]], calls: int = 64, repeat: int = 10, warmup: int = 2
) -> float:
    """Median GPU seconds of one call when `calls` calls, taken round-robin from `fns`,
    are replayed from one CUDA graph: what a step of a graph-captured decode pays.

    Timing single eager calls of a microsecond kernel measures the CPU's launch path,
    not the kernel. Each function of `fns` should read its own copy of the operands, and
    the copies together should exceed the L2 cache (see `l2_rotation`), so every call
    streams its operands from memory as it would in a model with many layers.
    Functions that tune themselves on their first call must be called before (warm-up)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # eager side-stream calls, as torch.cuda.graph advises
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(times)


def l2_rotation(bytes_per_call: int, device: str = "cuda", factor: int = 3, most: int = 64) -> int:
    """How many copies of a call's operands make their total `factor` times the L2 cache
    (at least 1, at most `most`)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(most, -(-factor * l2 // max(1, bytes_per_call))))


def measure_copy_bandwidth(n_bytes: int = 2**30, device: str = "cuda") -> float:
    """Achieved device-to-device copy bandwidth in bytes/s (bytes read + bytes written):
    the practical ceiling for memory-bound kernels, measured in the same run."""
    src = torch.empty(n_bytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), warmup=3, repeat=20, device=device)
    return 2 * src.numel() / seconds


def save_result(name: str, data: dict[str, Any], fig=None, out_dir: Path | None = None) -> Path:
    """Write `<name>.json` (data + environment) and, if given, `<name>.png`; return the JSON."""
    out = Path(out_dir or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), **data}
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if fig is not None:
        fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    return path
