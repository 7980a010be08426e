"""What one decode of a near-limit image costs, by kind of image.

    python -m bench.decode_peaks [--side 4096]

For each kind (RGBA PNG, keyed 8-bit RGB, keyed 16-bit gray, palette with tRNS,
baseline and progressive JPEG in RGB and CMYK) it decodes one side x side image for a
32x32 grayscale model in a fresh process, through `serving.core.preprocess.ImageDecoder`,
and prints how much the process's peak RSS (VmHWM) grew, in MiB and bytes a pixel.
Linux only (/proc). Numbers for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pngs import GRAY, PALETTE, RGB, write_png  # noqa: E402

CHILD = """
import sys
from bench.harness import peak_rss_bytes
from serving.core.preprocess import ImageDecoder, ImageLimits
def peak_kb():  # VmHWM: reset by exec, unlike ru_maxrss
    return peak_rss_bytes() // 1024
spec = {"color_mode": "L", "height": 32, "width": 32, "resample": "bilinear",
        "scale": 1 / 255, "mean": [0.0], "std": [1.0], "background": [0]}
data = open(sys.argv[1], "rb").read()
before = peak_kb()
ImageDecoder(ImageLimits(max_pixels=int(sys.argv[2]))).tensor(data, spec)
print(peak_kb() - before)
"""


def decode_peak_kib(path: Path, max_pixels: int) -> int:
    """How much one decode of the image at `path` grows a fresh process's peak RSS, KiB
    (for a 32x32 grayscale model, through `ImageDecoder`)."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(max_pixels)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout)


def images(side: int) -> dict[str, bytes]:
    ramp = (np.arange(side)[None, :] % 4096 * 16).repeat(side, axis=0)[..., None]  # 16-bit
    gray8 = Image.fromarray((ramp[..., 0] >> 8).astype(np.uint8), "L")
    out = {}
    buf = io.BytesIO()
    Image.merge("RGBA", [gray8] * 4).save(buf, "PNG")
    out["RGBA PNG"] = buf.getvalue()
    rgb = np.repeat(ramp >> 8, 3, axis=2)
    out["8-bit RGB PNG with a tRNS key"] = write_png(
        rgb, RGB, 8, transparency=struct.pack(">HHH", 0, 0, 0)
    )
    out["16-bit gray PNG with a tRNS key"] = write_png(
        ramp, GRAY, 16, transparency=struct.pack(">H", 0)
    )
    palette = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    out["palette PNG with tRNS"] = write_png(
        ramp >> 8, PALETTE, 8, palette=palette, transparency=bytes([0] * 10 + [255])
    )
    for mode in ("RGB", "CMYK"):
        for progressive in (False, True):
            buf = io.BytesIO()
            gray8.convert(mode).save(buf, "JPEG", progressive=progressive)
            name = "progressive" if progressive else "baseline"
            out[f"{name} {mode} JPEG"] = buf.getvalue()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=4096)
    args = p.parse_args(argv)
    pixels = args.side * args.side
    print(f"| image ({args.side}x{args.side}) | MiB | bytes a pixel |")
    print("| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in images(args.side).items():
            path = Path(tmp) / "image"
            path.write_bytes(data)
            kib = decode_peak_kib(path, pixels)
            print(f"| {name} | {kib / 1024:.0f} | {kib * 1024 / pixels:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
