"""Tokenizers: the text tokenizer (`text.py`) and the VQ image tokenizers (`vq.py`)."""
