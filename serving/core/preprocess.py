"""Images in any size and mode -> the tensor a model's metadata asks for.

Decoding is bounded three ways, so a small request cannot make the process big:
- the pixel count is read from the header and checked before anything is decoded
  (`ImageLimits.max_pixels`, one message whatever the size);
- the work is proportional to what the model needs: JPEG decodes at a reduced
  scale (libjpeg's DCT scaling), and any image is reduced by whole factors to no
  less than `REDUCING_GAP` times the model's input before alpha, colour or float
  conversions, so no full-resolution copy is made beyond the decoded 8-bit image;
- `ImageDecoder` runs at most `max_concurrent_decodes` decodes at once, so peak
  memory has a ceiling: that many times `max_pixels` x 8 bytes. A decode holds the
  decoded image in Pillow's storage (1 to 4 bytes a pixel) and strips of 1 megapixel;
  measured at 4096x4096: 74 MB for RGBA PNG, 45 MB for 16-bit gray with a key, 5 MB
  for baseline JPEG; progressive JPEG is the worst case, because libjpeg keeps every
  DCT coefficient (2 bytes a sample): 52 MB for RGB, 132 MB for CMYK.

Every sample depth a PNG or JPEG can hold (1, 2, 4, 8 and 16 bits) becomes the 8-bit
image a model was trained on by scaling, never by clipping.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from serving.core.card import Preprocess
from serving.errors import InvalidArgument, ResourceExhausted

RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
FORMATS = ("PNG", "JPEG")
# Whole-factor reduction keeps at least this many pixels per model input pixel; the
# final resize then filters as before (Pillow's own `reducing_gap` idea).
REDUCING_GAP = 2
STRIP_PIXELS = 1 << 20  # source pixels per strip when a reduction needs a converted copy
# Our limit is checked on the header first; Pillow's own bomb check would answer a
# different message above its limit, so it is off (serving owns this process).
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 16 * 1024 * 1024
    # 4096 x 4096: a 12-megapixel phone photo fits; our models read 32x32 and 64x64.
    max_pixels: int = 4096 * 4096
    max_concurrent_decodes: int = 2  # the cores of the machine we measure on
    # Past this, a request waiting for a decoder is refused: waiting holds an RPC thread.
    decode_wait_s: float = 2.0


def _sample_bits(image: Image.Image) -> int:
    """Bits per sample as stored in the file, read from the loader's raw mode before
    `load()`: "L;2" -> 2, "I;16B" / "RGB;16B" -> 16, otherwise 8."""
    if image.format != "PNG" or not image.tile:
        return 8
    rawmode = image.tile[0][3]  # (codec, extents, offset, args) in every Pillow release
    rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
    _, _, bits = str(rawmode).partition(";")
    return int(bits.rstrip("BLN")) if bits.rstrip("BLN").isdigit() else 8


def _to_8bit(image: Image.Image, bits: int) -> Image.Image:
    """Scale deep and shallow samples to 8 bits; transparency keys with them."""
    key = image.info.get("transparency")
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (PNG decodes to I;16, older Pillow to I): v * 257 is the
        # 8-bit twin of v, so the high byte is exact for it and rounds the rest.
        samples = np.asarray(image)
        if samples.dtype.kind != "u":  # mode I holds int32
            samples = np.clip(samples, 0, 65535).astype(np.uint16)
        gray = Image.fromarray((samples >> 8).astype(np.uint8), "L")
        if isinstance(key, int):  # the tRNS key is a 16-bit value: match it exactly
            alpha = np.multiply(samples != key, 255, dtype=np.uint8)
            return Image.merge("LA", (gray, Image.fromarray(alpha, "L")))
        return gray
    if image.mode == "F":  # float samples in [0, 1] (no PNG or JPEG decodes to it)
        samples = np.nan_to_num(np.asarray(image), nan=0.0)
        return Image.fromarray((np.clip(samples, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    if key is not None and (bits != 8 or image.mode == "1") and image.mode in ("1", "L", "RGB"):
        info = dict(image.info)
        if image.mode == "1":  # Pillow releases differ: the key as 0/1 or as 0/255
            info["transparency"] = 255 if key else 0
        elif bits < 8:  # Pillow scales 1/2/4-bit gray to 0..255 but leaves the key raw
            info["transparency"] = key * 255 // (2**bits - 1)
        else:
            # 16-bit RGB reaches us cut to the high byte (Pillow's decoder), so its key is
            # cut the same way: approximate, pixels sharing the key's high bytes match too.
            info["transparency"] = tuple(v >> 8 for v in key)
        image.info = info
    return image


def _reducible(image: Image.Image) -> Image.Image:
    """The image in a mode `reduce` takes, any transparency key turned into alpha (a key
    cannot survive averaging)."""
    keyed = "transparency" in image.info
    if image.mode in ("P", "PA"):
        return image.convert("RGBA" if keyed or image.mode == "PA" else "RGB")
    if image.mode == "1" or (image.mode == "L" and keyed):
        return image.convert("LA" if keyed else "L")
    if image.mode == "RGB" and keyed:
        return image.convert("RGBA")
    return image


Box = tuple[float, float, float, float]


def reduce_for(
    image: Image.Image, size: tuple[int, int], bits: int = 8
) -> tuple[Image.Image, Box | None]:
    """The image in 8 bits, reduced by the largest whole factor that keeps
    REDUCING_GAP x `size` (w, h); `bits` as `_sample_bits` read them.

    Returns the image and the box the original covers in it (a partial last block
    makes the reduced image slightly larger than original / factor), for the final
    resize, or None when nothing was reduced.
    """
    factor = int(min(image.width / size[0], image.height / size[1]) / REDUCING_GAP)
    if factor < 2:
        return _to_8bit(image, bits), None
    box = (0.0, 0.0, image.width / factor, image.height / factor)
    return _reduce_in_strips(image, factor, bits), box


def _reduce_in_strips(image: Image.Image, factor: int, bits: int) -> Image.Image:
    """Depth, palette, key and alpha conversions and the reduction, a strip of whole
    blocks at a time, so no converted copy of the image exists at full resolution.
    Colours are averaged premultiplied by alpha (as Pillow's `reduce` does, on a
    full-size copy), so transparent pixels' hidden colours do not bleed in."""
    out = None
    rows = max(1, STRIP_PIXELS // (image.width * factor)) * factor
    for top in range(0, image.height, rows):
        strip = image.crop((0, top, image.width, min(image.height, top + rows)))
        strip = _reducible(_to_8bit(strip, bits))
        premultiplied = {"RGBA": "RGBa", "LA": "La"}.get(strip.mode)
        if premultiplied:
            small = strip.convert(premultiplied).reduce(factor).convert(strip.mode)
        else:
            small = strip.reduce(factor)
        if out is None:
            size = (-(-image.width // factor), -(-image.height // factor))
            out = Image.new(small.mode, size)
        out.paste(small, (0, top // factor))
    return out


def decode_image(
    data: bytes, field: str = "image", limits: ImageLimits = ImageLimits()
) -> Image.Image:
    """Decode PNG or JPEG bytes fully to an 8-bit image; anything else is
    INVALID_ARGUMENT naming the field."""
    image, bits = _decode(data, field, limits, None)
    return _to_8bit(image, bits)


def decode_reduced(
    data: bytes, size: tuple[int, int], field: str = "image", limits: ImageLimits = ImageLimits()
) -> tuple[Image.Image, Box | None]:
    """Decode for a model input of `size` (w, h): JPEG at a reduced scale, then any
    image reduced by whole factors, never below REDUCING_GAP x size. Returns the image
    and the box for the final resize (see `reduce_for`)."""
    image, bits = _decode(data, field, limits, size)
    return reduce_for(image, size, bits)


def _decode(
    data: bytes, field: str, limits: ImageLimits, size: tuple[int, int] | None
) -> tuple[Image.Image, int]:
    """The decoded image as Pillow gives it, and its bits per sample in the file."""
    check_encoded(data, field, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
        raise _undecodable(field, exc) from None
    if image.width * image.height > limits.max_pixels:
        raise InvalidArgument(
            field,
            f"{image.width}x{image.height} = {image.width * image.height} pixels; "
            f"at most {limits.max_pixels} allowed",
        )
    try:
        if size and image.format == "JPEG":
            image.draft(None, (size[0] * REDUCING_GAP, size[1] * REDUCING_GAP))
        bits = _sample_bits(image)
        image.load()
    except Exception as exc:  # noqa: BLE001
        raise _undecodable(field, exc) from None
    return image, bits


def check_encoded(data: bytes, field: str, limits: ImageLimits) -> None:
    """The checks that need no decoding: present, and not too many bytes."""
    if not data:
        raise InvalidArgument(field, "empty; send encoded PNG or JPEG bytes")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(field, f"{len(data)} bytes; at most {limits.max_bytes} allowed")


def _undecodable(field: str, exc: Exception) -> InvalidArgument:
    return InvalidArgument(
        field, f"cannot decode as PNG or JPEG ({type(exc).__name__}); send PNG or JPEG bytes"
    )


def flatten_alpha(image: Image.Image, background: tuple[int, ...] | None) -> Image.Image:
    """Composite an image with transparency onto the background the model was trained
    on: transparent means background (dropping alpha would expose whatever colour the
    transparent pixels happen to store, often black)."""
    if background is None:
        return image
    if image.mode not in ("RGBA", "LA", "PA") and not (
        image.mode in ("P", "L", "RGB", "1") and "transparency" in image.info
    ):
        return image
    fill = tuple(background) * 3 if len(background) == 1 else tuple(background)
    base = Image.new("RGBA", image.size, (*fill, 255))
    return Image.alpha_composite(base, image.convert("RGBA")).convert("RGB")


def _spec(spec: Preprocess | Mapping) -> Preprocess:
    """A card's preprocessing, typed (its JSON form, a mapping, is read as one)."""
    return spec if isinstance(spec, Preprocess) else Preprocess.from_json(spec)


def image_to_tensor(
    image: Image.Image, spec: Preprocess | Mapping, field: str = "image", box: Box | None = None
) -> np.ndarray:
    """Flatten transparency, convert, resize (the region `box` of the image, all of it
    by default), scale and normalize: [C, H, W] float32, as the model card says."""
    spec = _spec(spec)
    image = flatten_alpha(image, spec.background)
    try:
        image = image.convert(spec.color_mode)
    except ValueError as exc:
        raise InvalidArgument(
            field, f"cannot convert mode {image.mode} to {spec.color_mode} ({exc})"
        ) from None
    image = image.resize((spec.width, spec.height), RESAMPLE[spec.resample], box)
    x = np.asarray(image, dtype=np.float32) * np.float32(spec.scale)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)  # [C, H, W]
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    return (x - mean) / std


class ImageDecoder:
    """Client image bytes -> model input, at most `max_concurrent_decodes` at a time.

    One per server, shared by every model that reads images, so the bound is global.
    """

    def __init__(self, limits: ImageLimits = ImageLimits()):
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_concurrent_decodes)

    def tensor(
        self, data: bytes, spec: Preprocess | Mapping, field: str = "image", wait: bool = True
    ) -> np.ndarray | None:
        """Encoded bytes -> [C, H, W] float32 as `spec` (a model card's preprocess) says.
        `wait=False`: None at once when every decoder is busy (the event loop asks so)."""
        check_encoded(data, field, self.limits)  # refuse before queueing for a decoder
        if not self._slots.acquire(timeout=self.limits.decode_wait_s if wait else 0):
            if not wait:
                return None
            raise ResourceExhausted(
                f"{field}: all {self.limits.max_concurrent_decodes} image decoders stayed busy "
                f"for {self.limits.decode_wait_s:g} s; retry later"
            )
        try:
            spec = _spec(spec)
            image, box = decode_reduced(data, (spec.width, spec.height), field, self.limits)
            return image_to_tensor(image, spec, field, box)
        finally:
            self._slots.release()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # a PNG file's first 8 bytes
