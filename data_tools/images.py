"""Image decoding and the stage transform: to RGB, resize with antialiasing, centre crop.

Square stages crop the centre square (`resize_center_crop`); aspect-ratio buckets keep the image's
shape and crop only the sliver between its ratio and the bucket's (`resize_to_bucket`).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = 1 << 28  # large web images are fine; decompression bombs are not


class ImageSkip(ValueError):
    """A sample whose image cannot be used; the message is the per-shard report's reason."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts grey, palette, CMYK, 16-bit and alpha images to RGB (alpha over white)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, resolution: int, min_size: int) -> tuple[Image.Image, int, int]:
    """Decodes image bytes; returns (image, original width, original height).

    JPEGs are decoded at a reduced DCT scale when they are much larger than needed (`draft`),
    which keeps at least `resolution` pixels on the short side.

    Raises:
        ImageSkip: undecodable, or smaller than `min_size` on its short side.
    """
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if min(width, height) < min_size:
            # the size after the colon: the manifest counts reasons up to the first colon
            raise ImageSkip(f"image below --min-size {min_size}: {width}x{height}")
        if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
            scale = min(width, height) / resolution
            if scale >= 2:
                img.draft(img.mode, (width // int(scale), height // int(scale)))
        img.load()
    except ImageSkip:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ImageSkip(f"undecodable image: {type(exc).__name__}: {exc}") from None
    return img, width, height


def resize_center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """Resizes the short side to `resolution` (antialiased) and crops the centre square.

    Returns:
        uint8 array (resolution, resolution, 3).
    """
    return resize_to_bucket(img, resolution, resolution)  # the square bucket: the same pixels


def resize_to_bucket(img: Image.Image, width: int, height: int) -> np.ndarray:
    """Resizes to cover `width` x `height` (antialiased) and crops the centre to exactly that.

    The scale is the larger of the two side ratios, so one side fits exactly and only the other
    loses the sliver by which the image's ratio differs from the bucket's: a 200x100 image into a
    48x24 bucket keeps all of its content.

    Args:
        img: any PIL image (converted to RGB).
        width: bucket width in pixels.
        height: bucket height in pixels.

    Returns:
        uint8 array (height, width, 3).
    """
    img = to_rgb(img)
    w, h = img.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - width) // 2, (nh - height) // 2
    img = img.crop((left, top, left + width, top + height))
    return np.asarray(img, dtype=np.uint8)


def to_tensor_batch(arrays: list[np.ndarray]):
    """uint8 (H, W, 3) arrays to a float tensor [B, 3, H, W] in [-1, 1]."""
    import torch

    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0
