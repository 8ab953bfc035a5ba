"""Loss curves as PNG files, written with zlib + struct only (no plotting dependency).

A PNG is the 8-byte signature and chunks `length | type | data | CRC-32(type + data)`: IHDR (width, height,
bit depth 8, colour type 2 = RGB), IDAT (the zlib-compressed scanlines, each prefixed with filter byte 0) and
IEND. The chart is rasterised by hand: a white canvas, a grey frame with quarter grid lines, and each series
drawn as connected segments (Bresenham-style stepping, 2 px thick) in its own colour, x and y scaled to the
joint data range. It has no text; the JSONL metrics carry the numbers.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from tinyllm.atomic import atomic_write_bytes

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: bytearray, width: int, height: int) -> bytes:
    """RGB pixels (row-major, 3 bytes each) → PNG bytes."""
    if len(pixels) != width * height * 3:
        raise ValueError(f"{len(pixels)} bytes is not {width}×{height} RGB")
    stride = width * 3
    raw = b"".join(b"\x00" + bytes(pixels[y * stride:(y + 1) * stride]) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b""))


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, c: tuple[int, int, int], size: int = 1) -> None:
        for dx in range(size):
            for dy in range(size):
                xx, yy = x + dx, y + dy
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = (yy * self.w + xx) * 3
                    self.px[i:i + 3] = bytes(c)

    def line(self, x0: int, y0: int, x1: int, y1: int, c: tuple[int, int, int], size: int = 1) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(n + 1):
            self.dot(round(x0 + (x1 - x0) * k / n), round(y0 + (y1 - y0) * k / n), c, size)


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], width: int = 640,
               height: int = 400) -> bytes:
    """PNG bytes of one chart with each named (xs, ys) series as a line; non-finite points are skipped."""
    pts = {k: [(float(x), float(y)) for x, y in zip(*v) if math.isfinite(x) and math.isfinite(y)]
           for k, v in series.items()}
    allp = [p for v in pts.values() for p in v]
    cv = _Canvas(width, height)
    m = 20  # margin in pixels
    left, right, top, bottom = m, width - m, m, height - m
    grey, light = (120, 120, 120), (225, 225, 225)
    for q in range(1, 4):
        y = top + (bottom - top) * q // 4
        x = left + (right - left) * q // 4
        cv.line(left, y, right, y, light)
        cv.line(x, top, x, bottom, light)
    for a, b, c, d in ((left, top, right, top), (left, bottom, right, bottom),
                       (left, top, left, bottom), (right, top, right, bottom)):
        cv.line(a, b, c, d, grey)
    if allp:
        x_lo, x_hi = min(p[0] for p in allp), max(p[0] for p in allp)
        y_lo, y_hi = min(p[1] for p in allp), max(p[1] for p in allp)
        x_span, y_span = (x_hi - x_lo) or 1.0, (y_hi - y_lo) or 1.0

        def to_px(p: tuple[float, float]) -> tuple[int, int]:
            return (round(left + (p[0] - x_lo) / x_span * (right - left)),
                    round(bottom - (p[1] - y_lo) / y_span * (bottom - top)))

        for i, v in enumerate(pts.values()):
            color = COLORS[i % len(COLORS)]
            xy = [to_px(p) for p in v]
            if len(xy) == 1:
                cv.dot(*xy[0], color, 3)
            for (xa, ya), (xb, yb) in itertools.pairwise(xy):
                cv.line(xa, ya, xb, yb, color, 2)
    return encode_png(cv.px, width, height)


def write_loss_plot(path: str | os.PathLike, series: dict[str, tuple[Sequence[float], Sequence[float]]],
                    width: int = 640, height: int = 400) -> Path:
    """Write `line_chart(series)` to `path` atomically."""
    return atomic_write_bytes(path, line_chart(series, width, height))
