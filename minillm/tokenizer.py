"""Tokenizers from a model folder, and incremental (streaming) detokenization.

A folder's `tokenizer.json` is read with the `tokenizers` library (fast, no Python
fallback needed); folders that only have the older formats (e.g. `tokenizer.model`) go
through `transformers.AutoTokenizer`. Special tokens come from `tokenizer_config.json`.

Streaming text one token at a time is subtle: a byte-level token can hold half of a
UTF-8 character, and some tokenizers change how a token prints depending on its left
neighbour. `StreamDecoder` re-decodes a short window and emits only text that can no
longer change.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from minillm.bundled import resolve_model_path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older files
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids for one model folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_file = self.path / "tokenizer_config.json"
        self.config: dict = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self._fast = None  # tokenizers.Tokenizer
        self._hf = None  # transformers tokenizer
        if (self.path / "tokenizer.json").exists():
            from tokenizers import Tokenizer as FastTokenizer

            try:
                self._fast = FastTokenizer.from_file(str(self.path / "tokenizer.json"))
            except Exception as e:
                raise ValueError(f"cannot read {self.path / 'tokenizer.json'}: {e}") from None
        else:
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            except Exception as e:
                raise ValueError(f"no usable tokenizer in {self.path}: {e}") from None
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        if self._hf is not None:
            self.bos_token = self.bos_token or self._hf.bos_token
            self.eos_token = self.eos_token or self._hf.eos_token

    @property
    def vocab_size(self) -> int:
        if self._fast is not None:
            return self._fast.get_vocab_size(with_added_tokens=True)
        return len(self._hf)

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if self._fast is not None:
            return self._fast.token_to_id(token)
        return self._hf.convert_tokens_to_ids(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the tokenizer's template
        adds (e.g. a beginning-of-sequence token)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=add_special_tokens).ids
        return self._hf.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        if self._fast is not None:
            encs = self._fast.encode_batch(texts, add_special_tokens=add_special_tokens)
            return [e.ids for e in encs]
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def save(self, path: str | Path) -> None:
        """Copy the tokenizer files into another model folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if path.resolve() == self.path.resolve():
            return
        for name in TOKENIZER_FILES:
            if (self.path / name).exists():
                shutil.copyfile(self.path / name, path / name)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Turns a stream of token ids into a stream of text pieces.

    `push(id)` returns the text that became final with this token (maybe ""), and
    `flush()` the rest. Joined, the pieces equal `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window re-decoded for context
        self.read_offset = 0  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # no half character
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]


def load_tokenizer(name_or_path: str | Path = "minillm-tiny") -> Tokenizer:
    """The tokenizer of a bundled model name or a local model folder."""
    path = resolve_model_path(name_or_path)
    if not path.is_dir():
        raise ValueError(f"no such model folder: {path}")
    return Tokenizer(path)
