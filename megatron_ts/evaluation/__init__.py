"""Evaluation of generated images: the demo-grammar analyser and `ts-eval`."""
