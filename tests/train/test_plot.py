"""The dependency-free PNG loss chart (tinyllm/train/plot.py) is a valid PNG."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from tinyllm.train.plot import write_loss_plot


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append((kind, body))
        pos += 12 + n
    return out


def test_loss_chart_is_a_valid_png(tmp_path: Path) -> None:
    xs = list(range(1, 51))
    path = write_loss_plot(tmp_path / "loss.png", {"train": (xs, [5.0 / x for x in xs]),
                                                   "eval": ([10, 50], [0.6, float("nan")])}, 200, 120)
    chunks = _chunks(path.read_bytes())
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (w, h, depth, color, comp, filt, interlace) == (200, 120, 8, 2, 0, 0, 0)
    raw = zlib.decompress(chunks[1][1])
    assert len(raw) == h * (1 + 3 * w)
    rows = [raw[y * (1 + 3 * w) + 1:(y + 1) * (1 + 3 * w)] for y in range(h)]
    pixels = {bytes(r[i:i + 3]) for r in rows for i in range(0, 3 * w, 3)}
    assert bytes((31, 119, 180)) in pixels and bytes((255, 127, 14)) in pixels  # both series drawn
    # the decreasing curve starts high on the left and ends low on the right
    blue = bytes((31, 119, 180))
    ys = [y for y, r in enumerate(rows) for i in range(0, 3 * w, 3) if r[i:i + 3] == blue and i // 3 < 25]
    assert ys and min(ys) < h // 3
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
