"""Starting process groups: `torchrun` on GPUs, or `spawn` for gloo groups on a CPU.

Two ways in, one code path after: both hand the worker a `torch.distributed` process group.

- `init_distributed()`: inside a script started by `torchrun`; NCCL when CUDA is present
  (each rank on its `LOCAL_RANK` GPU), gloo otherwise.
- `spawn(fn, world_size)`: from a test, notebook or laptop; starts `world_size` gloo
  processes (a `forkserver` imports torch once, so later starts cost ~0.1 s), runs
  `fn(group, *args)` in each and returns the per-rank results.

Nothing may hang: collectives fail after `collective_timeout_s` with a clear error (see
`minillm.parallel.comm`), and `spawn` kills every process and raises `SpawnTimeoutError`
once `timeout_s` has passed.
"""

from __future__ import annotations

import datetime
import importlib
import os
import queue
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ProcessGroup = dist.ProcessGroup


class SpawnError(RuntimeError):
    """A spawned rank raised an exception or exited without a result."""


class SpawnTimeoutError(TimeoutError):
    """The spawned group did not finish within its time limit (its processes were killed)."""


def init_distributed(
    backend: str | None = None, collective_timeout_s: float = 300.0
) -> ProcessGroup:
    """Initialize the default group from torchrun's environment; return the world group.

    backend: "nccl" or "gloo"; default NCCL when CUDA is present (and sets the device to
    LOCAL_RANK), gloo otherwise."""
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(
                f"{var} is not set: start this script with torchrun (e.g. `torchrun "
                "--standalone --nproc_per_node=2 -m benchmarks.<name>`) or use "
                "minillm.parallel.spawn"
            )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=collective_timeout_s), **kwargs
        )
    return dist.group.WORLD


def group_device(group: ProcessGroup) -> torch.device:
    """The device tensors must live on for this group: the current CUDA device for NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _importable_name(fn: Callable[..., Any]) -> tuple[str, str]:
    """(module, qualified name) by which a child process can import `fn`."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module == "__main__":  # `python -m pkg.mod`: the module has a real name too
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None and spec.name else None
    if module is None or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(
            f"spawn needs an importable function; {qualname or fn!r} is defined in a notebook "
            "cell, a script's __main__ or inside another function. Move it into a module."
        )
    return module, qualname


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    collective_timeout_s: float,
    fn_name: tuple[str, str],
    sys_path: list[str],
    args: tuple,
    results: Any,
) -> None:
    torch.set_num_threads(1)  # several ranks share the cores: no oversubscription
    try:
        sys.path[:0] = [p for p in sys_path if p not in sys.path]  # the parent's imports
        fn = importlib.import_module(fn_name[0])
        for part in fn_name[1].split("."):
            fn = getattr(fn, part)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
        out = fn(dist.group.WORLD, *args)
        results.put((rank, "ok", out))
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_CONTEXT = None


def _context():
    """A forkserver that has torch and minillm.parallel imported: fast, clean children.

    torch._dynamo is preloaded too: the first optimizer a process builds imports it, which
    costs seconds; paid once here instead of in every child."""
    global _CONTEXT  # a cache of the multiprocessing context, not state of any group
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(
            ["torch", "torch.distributed", "torch._dynamo", "minillm.parallel"]
        )
    return _CONTEXT


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 120.0,
    collective_timeout_s: float = 30.0,
) -> list[Any]:
    """Run `fn(group, *args)` on `world_size` gloo ranks; return `[result of rank 0, ...]`.

    `fn` must be importable (defined in a module, not in a notebook cell) and its
    arguments and result picklable; children see the caller's `sys.path`. Raises
    `SpawnError` with every failing rank's traceback, or `SpawnTimeoutError` after
    `timeout_s` seconds (all processes killed).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    fn_name = _importable_name(fn)
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="minillm-spawn-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    world_size,
                    init_file,
                    collective_timeout_s,
                    fn_name,
                    sys.path,
                    args,
                    results,
                ),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outcomes: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(outcomes) < world_size:
                try:
                    rank, status, payload = results.get(timeout=0.2)
                    outcomes[rank] = (status, payload)
                    continue
                except queue.Empty:
                    pass
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if r not in outcomes and p.exitcode is not None and results.empty()
                ]
                for r in dead:  # exited without reporting (os._exit, a signal)
                    outcomes[r] = ("error", f"process exited with code {procs[r].exitcode}")
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(outcomes))
                    raise SpawnTimeoutError(
                        f"ranks {missing} of {world_size} did not finish within {timeout_s} s "
                        "(processes killed); a rank is stuck in a computation or a collective"
                        + _format_errors(outcomes)
                    )
        finally:
            grace = 0.0 if time.monotonic() > deadline else 2.0  # timed out: kill at once
            for p in procs:
                p.join(timeout=grace)
                if p.is_alive():
                    p.kill()
                    p.join()
    n_errors = sum(status == "error" for status, _ in outcomes.values())
    if n_errors:
        raise SpawnError(f"{n_errors} of {world_size} ranks failed:" + _format_errors(outcomes))
    return [outcomes[r][1] for r in range(world_size)]


def _format_errors(outcomes: dict[int, tuple[str, Any]]) -> str:
    return "".join(
        f"\n--- rank {r} ---\n{msg}"
        for r, (status, msg) in sorted(outcomes.items())
        if status == "error"
    )
