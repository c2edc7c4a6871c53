"""Text tokenizers: the built-in byte-level tokenizer or a local `tokenizers` JSON file.

This file is copied into every export (the pipeline encodes prompts with it); it imports only the
`tokenizers` package that transformers depends on.

A tokenizer is never downloaded: `spec` is `byte` or a path to a `tokenizer.json` (for example
Llama-3's). Its `identity` goes into the vocabulary layout of every token-shard manifest and every
checkpoint, so data and model made with different tokenizers cannot be mixed silently.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; no special tokens (those live in `VocabLayout`)."""

    vocab_size = 256
    identity = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A Hugging Face `tokenizers` JSON file; special tokens of the file are not added."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        raw = path.read_bytes()
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:
            raise ValueError(
                f"text tokenizer {path} is not a `tokenizers` JSON file ({exc}); pass "
                "--text byte or the tokenizer.json of the model"
            ) from exc
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.identity = f"{path.name}:{hashlib.sha256(raw).hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_text_tokenizer(spec: str) -> ByteTokenizer | JsonTokenizer:
    """Loads the text tokenizer named by `spec`.

    Args:
        spec: `byte` for the built-in byte-level tokenizer, or a path to a `tokenizers` JSON.

    Returns:
        An object with `encode`, `decode`, `vocab_size` and `identity`.

    Raises:
        FileNotFoundError: `spec` is neither `byte` nor an existing file.
    """
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"text tokenizer {spec!r} is neither 'byte' nor an existing tokenizers JSON file; "
            "pass a local tokenizer.json path (hub downloads are not supported)"
        )
    return JsonTokenizer(path)
