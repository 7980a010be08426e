"""A PNG writer for every colour type and bit depth the format has (Pillow writes only
some), so tests can send what real cameras, scanners and editors send."""

from __future__ import annotations

import struct
import zlib

import numpy as np

GRAY, RGB, PALETTE, GRAY_ALPHA, RGBA = 0, 2, 3, 4, 6
CHANNELS = {GRAY: 1, RGB: 3, PALETTE: 1, GRAY_ALPHA: 2, RGBA: 4}


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _pack_row(row: np.ndarray, bits: int) -> bytes:
    if bits == 16:
        return row.astype(">u2").tobytes()
    if bits == 8:
        return row.astype(np.uint8).tobytes()
    per_byte = 8 // bits
    padded = np.zeros(-(-row.size // per_byte) * per_byte, np.uint8)
    padded[: row.size] = row
    groups = padded.reshape(-1, per_byte).astype(np.uint16)
    shifts = np.arange(per_byte - 1, -1, -1) * bits
    return (groups << shifts).sum(axis=1).astype(np.uint8).tobytes()


def write_png(
    samples: np.ndarray,
    color_type: int,
    bits: int,
    palette: np.ndarray | None = None,
    transparency: bytes | None = None,
    size: tuple[int, int] | None = None,
) -> bytes:
    """samples: [H, W, C] integers at `bits` per sample (C from the colour type);
    palette: [N, 3] uint8 for PALETTE; transparency: the raw tRNS chunk; size: claim
    another (w, h) in the header than the samples have (a header-only bomb)."""
    h, w = samples.shape[:2]
    assert samples.shape[2] == CHANNELS[color_type]
    width, height = size or (w, h)
    header = struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, 0)
    rows = b"".join(b"\0" + _pack_row(samples[y].reshape(-1), bits) for y in range(h))
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
    if palette is not None:
        out += _chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    if transparency is not None:
        out += _chunk(b"tRNS", transparency)
    return out + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
