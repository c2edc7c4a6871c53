"""A word-level `tokenizers` JSON for the demo grammar.

The demo captions use about 25 distinct words, so a word-level tokenizer states a two-object
caption in 15 tokens where the byte-level one needs about 70: the text span, which the demo
model pays for at every step, shrinks five-fold. It is an ordinary `tokenizers` file, loaded
like Llama-3's through `tokenizer.text = PATH`.
"""

from __future__ import annotations

from pathlib import Path

from data_tools.demo import BACKGROUNDS, COLORS, POSITIONS, PREPOSITIONS, SHAPES, WIDE_POSITIONS

UNKNOWN = "[UNK]"


def demo_words() -> list[str]:
    """Every word the demo captions (and prompts) can contain, in a fixed order."""
    words = ["a", "an", "in", "the", "and", "on", "background"]
    # the wide grammar adds no word today ("on the left"); listed last, so a word it adds
    # later extends the vocabulary without renumbering the others
    for phrase in [
        *COLORS,
        *SHAPES,
        *POSITIONS,
        *BACKGROUNDS,
        *WIDE_POSITIONS,
        *PREPOSITIONS.values(),
    ]:
        for word in phrase.split():
            if word not in words:
                words.append(word)
    return words


def write_demo_tokenizer(path: str | Path) -> Path:
    """Writes the demo's word-level tokenizer JSON (byte-identical for the same grammar)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {UNKNOWN: 0}
    for word in demo_words():
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = Whitespace()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(tokenizer.to_str(pretty=True))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m data_tools.demo_tokenizer OUT.json")
    print(write_demo_tokenizer(sys.argv[1]))
