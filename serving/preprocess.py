"""Images in any size and mode -> the tensor a classifier's metadata asks for."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from serving.errors import InvalidArgument

RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
FORMATS = ("PNG", "JPEG")
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_PIXELS = 40_000_000


def decode_image(data: bytes, field: str = "image") -> Image.Image:
    """Decode PNG or JPEG bytes fully; anything else is INVALID_ARGUMENT naming the field."""
    if not data:
        raise InvalidArgument(field, "empty; send encoded PNG or JPEG bytes")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidArgument(field, f"{len(data)} bytes; at most {MAX_IMAGE_BYTES} allowed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            if image.width * image.height > MAX_PIXELS:
                raise InvalidArgument(
                    field, f"{image.width}x{image.height} pixels; at most {MAX_PIXELS} allowed"
                )
            image.load()
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
        raise InvalidArgument(
            field, f"cannot decode as PNG or JPEG ({type(exc).__name__}); send PNG or JPEG bytes"
        ) from None
    return image


def flatten_alpha(image: Image.Image, background: list[int] | None) -> Image.Image:
    """Composite an image with transparency onto the background the model was trained
    on: transparent means background (dropping alpha would expose whatever colour the
    transparent pixels happen to store, often black)."""
    if background is None:
        return image
    if image.mode not in ("RGBA", "LA", "PA") and not (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        return image
    fill = tuple(background) * 3 if len(background) == 1 else tuple(background)
    base = Image.new("RGBA", image.size, (*fill, 255))
    return Image.alpha_composite(base, image.convert("RGBA")).convert("RGB")


def image_to_tensor(image: Image.Image, spec: dict, field: str = "image") -> np.ndarray:
    """Flatten transparency, convert, resize, scale and normalize: [C, H, W] float32, as
    the model card says."""
    image = flatten_alpha(image, spec.get("background"))
    try:
        image = image.convert(spec["color_mode"])
    except ValueError as exc:
        raise InvalidArgument(
            field, f"cannot convert mode {image.mode} to {spec['color_mode']} ({exc})"
        ) from None
    image = image.resize((spec["width"], spec["height"]), RESAMPLE[spec["resample"]])
    x = np.asarray(image, dtype=np.float32) * np.float32(spec["scale"])
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)  # [C, H, W]
    mean = np.asarray(spec["mean"], np.float32)[:, None, None]
    std = np.asarray(spec["std"], np.float32)[:, None, None]
    return (x - mean) / std
