"""PNG files of sampled images, with the prompt and the settings as text chunks."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def save_png(image: Image.Image, path: str | Path, prompt: str, settings: dict) -> Path:
    """Writes a PNG with the prompt and the settings (JSON) as text chunks; deterministic bytes."""
    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("settings", json.dumps(settings, sort_keys=True))
    info.add_text("Software", "megatron_ts ts-generate")
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path
