"""Triton kernels, installed as `minillm.kernels` (never as a top-level `kernels`).

Each kernel sits beside its naive PyTorch twin and follows the teaching order: the bytes
the naive op moves, pseudo-code, the kernel, its wrapper (check, allocate, launch), tests
on irregular shapes, and a benchmark. On a CPU the kernels run under the Triton
interpreter (`TRITON_INTERPRET=1`); on a CUDA GPU they compile.
"""

import os


def _step_aside_for_the_published_kernels() -> None:
    """Run as the top-level `kernels`, load the published package of that name instead.

    With a source checkout's root on sys.path (`python -m benchmarks.x` run from the root,
    or a test that puts the root there), Python finds this folder under the name `kernels`
    before site-packages. That name belongs to a published package (Hugging Face's kernel
    hub), which transformers imports when it is installed: load that one in this module's
    place (the import system returns whatever `sys.modules["kernels"]` holds once this file
    has run). Without it installed, this folder stays importable as before."""
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def is_root(entry: str) -> bool:
        try:
            return Path(entry or ".").resolve() == root
        except (OSError, RuntimeError):
            return False

    path = [p for p in sys.path if isinstance(p, str) and not is_root(p)]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise


if __name__ == "kernels":
    _step_aside_for_the_published_kernels()


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (no GPU compilation)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
