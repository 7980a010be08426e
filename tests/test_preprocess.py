"""Image decoding without gRPC: every mode a PNG or JPEG decodes to reads like its
8-bit twin; big images cost what the model needs; decodes are bounded."""

from __future__ import annotations

import io
import struct
import sys
import threading

import numpy as np
import pytest
from PIL import Image
from pngs import GRAY, GRAY_ALPHA, PALETTE, RGB, RGBA, write_png

from bench.decode_peaks import decode_peak_kib
from serving.core.preprocess import (
    ImageDecoder,
    ImageLimits,
    decode_image,
    decode_reduced,
    image_to_tensor,
)
from serving.errors import InvalidArgument, ResourceExhausted
from training.data.digits import digit_to_image, load_digits_split

GRAY_SPEC = {"color_mode": "L", "height": 32, "width": 32, "resample": "bilinear",
             "scale": 1 / 255, "mean": [0.0], "std": [1.0], "background": [0]}  # fmt: skip
RGB_SPEC = {**GRAY_SPEC, "color_mode": "RGB", "mean": [0.0] * 3, "std": [1.0] * 3,
            "background": [255, 255, 255]}  # fmt: skip


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    """A held-out digit at 40x40, 8-bit: [40, 40] uint8, ink bright on 0."""
    pixels = load_digits_split()[4][3]
    return np.asarray(digit_to_image(pixels).resize((40, 40), Image.BILINEAR))


def _alpha(v: np.ndarray) -> np.ndarray:
    """A varied alpha channel: a gradient, fully transparent in one corner."""
    a = np.tile(np.linspace(0, 255, v.shape[1]).astype(np.uint8), (v.shape[0], 1))
    a[:8, :8] = 0
    return a


def _la(v: np.ndarray, a: np.ndarray) -> Image.Image:
    return Image.merge("LA", (Image.fromarray(v, "L"), Image.fromarray(a, "L")))


def _cases(v: np.ndarray) -> dict[str, tuple[bytes, Image.Image]]:
    """{name: (encoded bytes, the 8-bit image they must decode like)}."""
    cases, a = {}, _alpha(v)
    g = v[..., None].astype(np.int64)
    for bits in (1, 2, 4, 8, 16):
        top = 2**bits - 1
        q = np.round(g * top / 255).astype(np.int64)
        twin = Image.fromarray(np.round(q[..., 0] * 255 / top).astype(np.uint8), "L")
        cases[f"gray {bits}-bit"] = (write_png(q, GRAY, bits), twin)
    key = int(v[0, 0])  # the background value: transparent by tRNS key
    keyed = np.where(v == key, 0, 255).astype(np.uint8)
    cases["gray 16-bit, tRNS key"] = (
        write_png(g * 257, GRAY, 16, transparency=struct.pack(">H", key * 257)),
        _la(v, keyed),
    )
    q2 = np.round(g * 3 / 255).astype(np.int64)
    cases["gray 2-bit, tRNS key"] = (
        write_png(q2, GRAY, 2, transparency=struct.pack(">H", int(q2[0, 0, 0]))),
        _la((q2[..., 0] * 85).astype(np.uint8), np.where(q2[..., 0] == q2[0, 0, 0], 0, 255)
            .astype(np.uint8)),
    )  # fmt: skip
    rgb = np.repeat(g, 3, axis=2)
    cases["RGB 8-bit"] = (write_png(rgb, RGB, 8), Image.fromarray(v, "L"))
    cases["RGB 16-bit"] = (write_png(rgb * 257, RGB, 16), Image.fromarray(v, "L"))
    cases["RGB 16-bit, tRNS key"] = (
        write_png(rgb * 257, RGB, 16, transparency=struct.pack(">HHH", *[key * 257] * 3)),
        _la(v, keyed),
    )
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    cases["palette 8-bit"] = (write_png(g, PALETTE, 8, palette=ramp), Image.fromarray(v, "L"))
    cases["palette 8-bit, tRNS"] = (
        write_png(g, PALETTE, 8, palette=ramp, transparency=bytes([255] * key + [0])),
        _la(v, keyed),
    )
    q4 = g >> 4
    cases["palette 4-bit"] = (
        write_png(q4, PALETTE, 4, palette=ramp[::17]),
        Image.fromarray((q4[..., 0] * 17).astype(np.uint8), "L"),
    )
    ga = np.stack([v, a], axis=2).astype(np.int64)
    cases["gray+alpha 8-bit"] = (write_png(ga, GRAY_ALPHA, 8), _la(v, a))
    cases["gray+alpha 16-bit"] = (write_png(ga * 257, GRAY_ALPHA, 16), _la(v, a))
    rgba = np.concatenate([rgb, a[..., None]], axis=2)
    cases["RGBA 8-bit"] = (write_png(rgba, RGBA, 8), _la(v, a))
    cases["RGBA 16-bit"] = (write_png(rgba * 257, RGBA, 16), _la(v, a))
    return cases


CASES = [
    "gray 1-bit", "gray 2-bit", "gray 4-bit", "gray 8-bit", "gray 16-bit",
    "gray 16-bit, tRNS key", "gray 2-bit, tRNS key", "RGB 8-bit", "RGB 16-bit",
    "RGB 16-bit, tRNS key", "palette 8-bit", "palette 8-bit, tRNS", "palette 4-bit",
    "gray+alpha 8-bit", "gray+alpha 16-bit", "RGBA 8-bit", "RGBA 16-bit",
]  # fmt: skip


@pytest.mark.parametrize("spec", [GRAY_SPEC, RGB_SPEC], ids=["to L", "to RGB"])
@pytest.mark.parametrize("case", CASES)
def test_every_png_mode_reads_like_its_8bit_twin(digit, case, spec):
    data, twin = _cases(digit)[case]
    want = image_to_tensor(twin, spec)
    got = image_to_tensor(decode_image(data), spec)
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=case)
    assert want.std() > 0.05  # not a blank image on both sides


def test_16bit_gray_is_scaled_not_clipped(digit):
    """The reproducer: background 2056/65535, ink 65535 was read as all white."""
    v16 = np.where(digit > 0, 65535, 2056)[..., None]
    got = image_to_tensor(decode_image(write_png(v16, GRAY, 16)), GRAY_SPEC)
    twin = Image.fromarray(np.where(digit > 0, 255, 8).astype(np.uint8), "L")
    np.testing.assert_allclose(got, image_to_tensor(twin, GRAY_SPEC), atol=1e-6)
    assert got.min() < 0.05  # the background stays dark


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_every_jpeg_mode_reads_like_the_gray_jpeg(digit, mode):
    gray = Image.fromarray(digit, "L")
    image = {
        "L": gray,
        "RGB": gray.convert("RGB"),
        "CMYK": Image.merge("CMYK", [Image.new("L", gray.size, 0)] * 3
                            + [Image.fromarray(255 - digit, "L")]),
    }[mode]  # fmt: skip
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    want = image_to_tensor(gray, GRAY_SPEC)
    got = image_to_tensor(decode_image(buf.getvalue()), GRAY_SPEC)
    assert np.abs(got - want).mean() < 0.02, mode  # JPEG is lossy; the modes agree


def _big(digit: np.ndarray, side: int, mode: str) -> Image.Image:
    image = Image.fromarray(digit, "L").resize((side, side), Image.BILINEAR)
    if mode == "RGBA":  # ink in alpha over white, as in the transparent-digit test
        return Image.merge("RGBA", [Image.new("L", image.size, 255)] * 3 + [image])
    return image.convert(mode)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("RGB", "JPEG")])
def test_big_images_are_reduced_before_conversion_and_read_the_same(digit, mode, fmt):
    buf = io.BytesIO()
    _big(digit, 2000, mode).save(buf, fmt)
    reduced, box = decode_reduced(buf.getvalue(), (32, 32))
    assert 64 <= reduced.width < 128  # reduced to within 2-4x the model's input, no further
    full = decode_image(buf.getvalue())
    assert full.size == (2000, 2000)
    a, b = image_to_tensor(reduced, GRAY_SPEC, box=box), image_to_tensor(full, GRAY_SPEC)
    diff = np.abs(a - b)  # what the model sees barely changes (edges move by a few levels)
    assert diff.mean() < 0.005 and diff.max() < 0.1, (diff.mean(), diff.max())
    small = image_to_tensor(Image.fromarray(digit, "L"), GRAY_SPEC)
    assert np.abs(a - small).mean() < 0.03


def _near_limit(kind: str, side: int) -> tuple[bytes, int]:
    """Encoded bytes, and the size of the decoded image in Pillow's own storage."""
    if kind == "rgba":  # real transparency: the old path composited it at full size
        image = Image.new("RGBA", (side, side), (255, 255, 255, 0))
        image.paste((0, 0, 0, 255), (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue(), side * side * 4
    ramp = (np.arange(side)[None, :] % 4096 * 16).repeat(side, axis=0)[..., None]
    return write_png(ramp, GRAY, 16, transparency=struct.pack(">H", 0)), side * side * 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("kind", ["rgba", "gray16 keyed"])
def test_decoding_a_near_limit_image_costs_little_more_than_the_decoded_image(tmp_path, kind):
    """4096x4096: a decode may hold the decoded image and strips of 1 megapixel, nothing
    else at full size. Before, RGBA with transparency grew the process by 257 MB (the
    full-size composite) and keyed 16-bit gray by ~200 MB (int64 masks)."""
    side = 4096
    data, decoded = _near_limit(kind, side)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    growth_mb = decode_peak_kib(path, side * side) // 1024  # a 32x32 L model, as GRAY_SPEC
    assert growth_mb < 1.25 * decoded / 2**20 + 16, growth_mb


def test_pixel_limit_is_one_message_below_and_above_pillows_own_limit():
    limits = ImageLimits(max_pixels=1_000_000)
    one = np.zeros((1, 1, 1), np.int64)
    for w, h in [(1001, 1000), (10_000, 10_000), (100_000, 100_000)]:  # Pillow's bomb: 179M+
        data = write_png(one, GRAY, 8, size=(w, h))  # the header claims it; never decoded
        with pytest.raises(InvalidArgument) as info:
            decode_image(data, limits=limits)
        want = f"image: {w}x{h} = {w * h} pixels; at most 1000000 allowed"
        assert str(info.value) == want
    assert decode_image(write_png(np.zeros((1000, 1000, 1), np.int64), GRAY, 8), limits=limits)


def test_concurrent_decodes_are_bounded(monkeypatch):
    """With one decoder, a second image waits, and past the wait it is refused."""
    import serving.core.preprocess as pre

    entered, release = threading.Event(), threading.Event()
    real = pre.decode_reduced

    def slow_decode(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(pre, "decode_reduced", slow_decode)
    decoder = ImageDecoder(ImageLimits(max_concurrent_decodes=1, decode_wait_s=0.2))
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    first = threading.Thread(target=decoder.tensor, args=(buf.getvalue(), GRAY_SPEC))
    first.start()
    assert entered.wait(10)
    with pytest.raises(ResourceExhausted, match="image: all 1 image decoders stayed busy"):
        decoder.tensor(buf.getvalue(), GRAY_SPEC)
    release.set()
    first.join(10)
    assert decoder.tensor(buf.getvalue(), GRAY_SPEC).shape == (1, 32, 32)  # slot returned
