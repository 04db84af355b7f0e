"""The training corpus: the Python standard library's own source files.

Every machine that runs minillm has it, offline, under the PSF license (which allows
redistribution with its notice: `minillm/assets/data/LICENSE-PSF.txt`). A file goes to
the held-out split when the SHA-256 of its path (relative to the stdlib folder) falls in
the first `HELDOUT_PERCENT` percent, to the validation split (used to pick the best
checkpoint) in the next `VAL_PERCENT`, so the split does not depend on file order or on
which files a given Python version has. `manifest.json` records each file's hash, so a
corpus built elsewhere can be compared with the one the bundled models saw.

The held-out text of the bundled models ships with the package
(`assets/data/heldout.txt.gz`): their perplexity can be checked on any machine.

Documents are joined by `EOT` ("<|endoftext|>"), which is also the tokenizer's
beginning-of-sequence token: every file is seen as `EOT file-text`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
import sysconfig
from pathlib import Path

import numpy as np

from minillm.bundled import ASSETS

EOT = "<|endoftext|>"
HELDOUT_PERCENT = 2
VAL_PERCENT = 2
SPLITS = ("train", "val", "heldout")
SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__"}
SHIPPED_HELDOUT = ASSETS / "data" / "heldout.txt.gz"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """'heldout' for about HELDOUT_PERCENT% of paths (by hash), 'val' for the next
    VAL_PERCENT%, else 'train'."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") % 100
    if h < HELDOUT_PERCENT:
        return "heldout"
    return "val" if h < HELDOUT_PERCENT + VAL_PERCENT else "train"


def stdlib_documents(root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of every UTF-8 `.py` file of the stdlib, sorted by path."""
    root = root or stdlib_root()
    docs = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if SKIP_PARTS & set(f.relative_to(root).parts):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
        if EOT in text or not text.strip():
            continue
        docs.append((rel, text))
    return docs


def build_corpus(out_dir: str | Path, root: Path | None = None) -> dict:
    """Write train.txt, val.txt, heldout.txt and manifest.json into `out_dir`.

    Returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents(root)
    if not docs:
        raise RuntimeError(f"no Python source files found under {root or stdlib_root()}")
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    files = []
    for rel, text in docs:
        split = split_of(rel)
        splits[split].append(text)
        files.append(
            {
                "path": rel,
                "split": split,
                "chars": len(text),
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
            }
        )
    for split, texts in splits.items():
        (out / f"{split}.txt").write_text(EOT.join(texts), encoding="utf-8")
    manifest = {
        "source": "Python standard library (.py files), PSF license",
        "python": platform.python_version(),
        "stdlib_root": str(root or stdlib_root()),
        "heldout_percent": HELDOUT_PERCENT,
        "val_percent": VAL_PERCENT,
        "documents": {s: len(t) for s, t in splits.items()},
        "chars": {s: sum(map(len, t)) for s, t in splits.items()},
        "sha256": {s: text_sha256(out / f"{s}.txt") for s in splits},
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def text_sha256(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return hashlib.sha256(data).hexdigest()


def read_documents(path: str | Path) -> list[str]:
    """The documents of a split file (`.txt` or `.txt.gz`)."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8").split(EOT)


def tokenize_documents(tokenizer, docs: list[str]) -> np.ndarray:
    """One uint16/uint32 stream `EOT doc EOT doc ...` (the tokenizer adds EOT in front)."""
    ids = tokenizer.encode_batch(docs, add_special_tokens=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    return np.concatenate([np.asarray(x, dtype=dtype) for x in ids])


def load_tokens(data_dir: str | Path, split: str, tokenizer) -> np.ndarray:
    """Token ids of a split, cached next to the text as `<split>.<tokenizer hash>.npy`.

    A folder may hold only the cache (e.g. copied to a machine with another Python)."""
    data_dir = Path(data_dir)
    tok_hash = text_sha256(tokenizer.path / "tokenizer.json")[:12]
    cache = data_dir / f"{split}.{tok_hash}.npy"
    if cache.exists():
        return np.load(cache)
    text_file = data_dir / f"{split}.txt"
    if not text_file.exists():
        raise FileNotFoundError(f"no {text_file.name} (or token cache {cache.name}) in {data_dir}")
    tokens = tokenize_documents(tokenizer, read_documents(text_file))
    np.save(cache, tokens)
    return tokens


def shipped_heldout_documents() -> list[str]:
    """The held-out documents the bundled models are evaluated on."""
    return read_documents(SHIPPED_HELDOUT)
