"""The combined vocabulary: text tokens, special tokens, then the VQ codebook.

Layout (ids ascending):

    [0, text_size)                      text tokenizer ids
    [text_size, text_size + 5)          <pad> <bos> <eos> <boi> <eoi>
    [code_offset, code_offset + codes)  VQ codes 0..codebook_size-1
    [.., padded_size)                   padding rows (model.vocab_multiple) so TP divides them

The layout is recorded in every token-shard manifest and every checkpoint; `check_compatible`
turns a mismatch between data and model into an error before the first step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megatron_ts.errors import EXIT_USAGE

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>")


class VocabMismatchError(ValueError):
    """Data and model disagree on the vocabulary layout."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class VocabLayout:
    text_size: int
    """Ids used by the text tokenizer."""
    codebook_size: int
    """VQ codes appended after the special tokens."""
    text_tokenizer: str = "byte"
    """Identity of the text tokenizer (`byte` or `name:sha256-prefix` of its JSON)."""
    vq_tokenizer: str = "native"
    """Identity of the VQ tokenizer (format and checkpoint hash prefix)."""
    specials: tuple[str, ...] = field(default=SPECIAL_TOKENS)

    @property
    def pad_id(self) -> int:
        return self.text_size + self.specials.index("<pad>")

    @property
    def bos_id(self) -> int:
        return self.text_size + self.specials.index("<bos>")

    @property
    def eos_id(self) -> int:
        return self.text_size + self.specials.index("<eos>")

    @property
    def boi_id(self) -> int:
        return self.text_size + self.specials.index("<boi>")

    @property
    def eoi_id(self) -> int:
        return self.text_size + self.specials.index("<eoi>")

    @property
    def code_offset(self) -> int:
        return self.text_size + len(self.specials)

    @property
    def size(self) -> int:
        """Ids in use (text + specials + codes), before padding."""
        return self.code_offset + self.codebook_size

    def padded_size(self, multiple: int) -> int:
        """Vocabulary rows in the embedding and head: `size` rounded up to `multiple`.

        The padding does not depend on the tensor-parallel size, so every layout of one model
        has the same rows (and the same initial weights for one seed); `validate()` checks that
        the tensor-parallel size divides it.
        """
        return -(-self.size // multiple) * multiple

    def code_to_id(self, code):
        """Maps codebook-local codes (int or array) to vocabulary ids."""
        return code + self.code_offset

    def id_to_code(self, token_id):
        """Maps vocabulary ids of codes back to codebook-local codes."""
        return token_id - self.code_offset

    def to_dict(self) -> dict:
        out = asdict(self)
        out["specials"] = list(self.specials)
        out["code_offset"] = self.code_offset
        out["size"] = self.size
        return out

    @classmethod
    def from_dict(cls, data: dict) -> VocabLayout:
        fields = {
            k: data[k]
            for k in ("text_size", "codebook_size", "text_tokenizer", "vq_tokenizer")
            if k in data
        }
        return cls(**fields, specials=tuple(data.get("specials", SPECIAL_TOKENS)))

    def check_compatible(self, other: VocabLayout, what: str = "data") -> None:
        """Raises VocabMismatchError naming the first field where `other` differs."""
        for name in ("text_size", "codebook_size", "text_tokenizer", "vq_tokenizer", "specials"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise VocabMismatchError(
                    f"vocabulary mismatch in {name}: model has {mine!r}, {what} has {theirs!r}; "
                    "re-tokenize the data with the model's tokenizers or train with matching "
                    "[tokenizer] settings"
                )
