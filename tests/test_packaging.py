"""Install layout: the package installs as `minillm` only; the Triton kernels folder
installs as `minillm.kernels`, never as a top-level `kernels` (a published package of
that name exists, and other libraries import it when they find it)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("minillm-*.whl")
    return zipfile.ZipFile(whl).namelist()


def test_wheel_has_only_minillm_at_top_level(wheel):
    tops = {name.split("/")[0] for name in wheel}
    assert tops == {"minillm", next(t for t in tops if t.endswith(".dist-info"))}
    assert "minillm/kernels/__init__.py" in wheel
    assert not any(name.startswith("kernels/") for name in wheel)


def test_wheel_has_every_package_and_the_bundled_models(wheel):
    for init in (ROOT / "minillm").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in wheel, f"{init} not packaged"
    for init in (ROOT / "kernels").rglob("__init__.py"):
        assert "minillm/" + init.relative_to(ROOT).as_posix() in wheel
    for name in ("minillm-tiny", "minillm-tiny-draft"):
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert f"minillm/assets/models/{name}/{f}" in wheel
    assert "minillm/assets/data/heldout.txt.gz" in wheel


def test_installed_import_names(tmp_path):
    """From a neutral folder: minillm.kernels imports; a top-level `kernels`, if one is
    installed at all (transformers >= 5.25 depends on the published package of that name),
    is never minillm's folder."""
    code = (
        "import importlib.util, minillm.kernels;"
        "spec = importlib.util.find_spec('kernels');"
        "print(spec is None or spec.origin != __import__('sys').argv[1],"
        " minillm.kernels.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "kernels" / "__init__.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "minillm.kernels"]


def _import_kernels_from_the_root(tmp_path, published: bool) -> list[str]:
    """`import kernels` with the repository root first on sys.path, and (if `published`)
    a stand-in for the published `kernels` package right after it."""
    site = tmp_path / "site"
    if published:
        (site / "kernels").mkdir(parents=True)
        (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'published'\n")
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
        "import kernels, minillm.kernels;"
        "print(getattr(kernels, 'CUDAProperties', 'ours'), hasattr(kernels, 'interpreting'),"
        " minillm.kernels.interpreting.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(site)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_root_folder_steps_aside_for_the_published_kernels(tmp_path):
    """Regression: with the root on sys.path (`python -m benchmarks.x`), `import kernels`
    found minillm's folder, and transformers' `from kernels import CUDAProperties` failed."""
    got = _import_kernels_from_the_root(tmp_path, published=True)
    assert got == ["published", "False", "minillm.kernels"], got


def test_the_root_folder_imports_as_before_without_a_published_kernels(tmp_path):
    """No published `kernels` anywhere on sys.path (site-packages left out): the folder
    itself imports, as it did before it learned to step aside."""
    code = (
        "import sys; sys.path[:] = [sys.argv[1]] + [p for p in sys.path[1:]"
        " if 'site-packages' not in p and 'dist-packages' not in p];"
        "import kernels; print(kernels.__file__ == sys.argv[2], kernels.interpreting())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(ROOT / "kernels" / "__init__.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_kernels_import_from_a_source_checkout(tmp_path):
    """With the repository root first on sys.path (e.g. `python -m benchmarks.x` run from
    the root), `minillm` is the plain folder, yet `minillm.kernels` still imports."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import minillm, minillm.kernels.flash_attn as f;"
        "print(minillm.__file__.startswith(sys.argv[1]), f.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "minillm.kernels.flash_attn"]
