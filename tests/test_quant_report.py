"""The texts of the quality report: validation tokens (for choosing settings) never hold
held-out text (for reporting them)."""

import numpy as np
import pytest

import minillm
from minillm.data import EOT, shipped_heldout_documents, split_of, stdlib_documents
from minillm.quant.report import validation_documents, validation_tokens


def name_in_split(split: str, stem: str) -> str:
    """A file name (found by search) that the hash split assigns to `split`."""
    return next(f"{stem}_{i}.py" for i in range(10_000) if split_of(f"{stem}_{i}.py") == split)


def test_validation_documents_are_the_val_split_only(tmp_path):
    heldout_text = min(shipped_heldout_documents(), key=len)
    files = {
        name_in_split("train", "train"): "TRAIN = 1\n",
        name_in_split("val", "val_a"): "VAL_A = 1\n",
        name_in_split("val", "val_b"): "VAL_B = 2\n",
        name_in_split("heldout", "held"): "HELD = 3\n",
        # a held-out document copied under a validation-split path: must be dropped
        name_in_split("val", "copy"): heldout_text,
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    docs = validation_documents(tmp_path)
    assert sorted(docs) == ["VAL_A = 1\n", "VAL_B = 2\n"]

    tok = minillm.load_tokenizer()
    text = tok.decode(validation_tokens(tok, None, tmp_path).tolist(), skip_special_tokens=False)
    assert text.count(EOT) == 2 and "VAL_A" in text and "VAL_B" in text
    assert "TRAIN" not in text and "HELD" not in text


def test_real_validation_split_is_disjoint_from_the_heldout_text():
    heldout = set(shipped_heldout_documents())
    val = validation_documents()
    assert val and not heldout & set(val)
    paths = [p for p, t in stdlib_documents() if t in set(val)]
    assert paths and all(split_of(p) != "heldout" for p in paths)


def test_validation_tokens_are_a_fixed_prefix():
    tok = minillm.load_tokenizer()
    a, b = validation_tokens(tok, 2048), validation_tokens(tok, 4096)
    assert len(a) == 2048 and np.array_equal(a, b[:2048])
    assert a[0] == tok.bos_token_id  # every document starts with EOT


def test_validation_tokens_bad_input():
    with pytest.raises(ValueError, match="max_tokens"):
        validation_tokens(minillm.load_tokenizer(), 0)
