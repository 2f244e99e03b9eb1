"""Tile bytes -> uint8 grey pixels for the training loader, fast for sarkit's own tiles.

``sarkit.raster.tileread`` is the one reading rule of every stage; this module gives the
same pixels from bytes (a file's, or a tar shard member's) and does it faster for the
tiles ``sarkit slice`` writes: classic little-endian TIFF, one 8-bit band, minimum-is-black,
uncompressed, zstd or deflate, no predictor, nodata 0 or none. Those are parsed here
(IFD tags, then one decompression per block): about 0.15 ms for a 256 px tile where a
GDAL open costs about 4 ms, most of the loader's time per pair. Anything else (other
layouts, dtypes, a nodata tag other than 0, JPEG, PNG) goes through tileread's own
decoders, so the pixels are always tileread's (tested against ``read_u8``).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np

from sarkit.raster.tileread import TileReadError, _one_line

# TIFF tags read by the fast path
WIDTH, HEIGHT, BITS, COMPRESSION, PHOTOMETRIC = 256, 257, 258, 259, 262
STRIP_OFFSETS, SAMPLES, ROWS_PER_STRIP, STRIP_COUNTS, PLANAR = 273, 277, 278, 279, 284
PREDICTOR, TILE_W, TILE_H, TILE_OFFSETS, TILE_COUNTS = 317, 322, 323, 324, 325
EXTRA_SAMPLES, SAMPLE_FORMAT, GDAL_NODATA = 338, 339, 42113
_FMT = {1: "B", 2: "s", 3: "H", 4: "I", 16: "Q"}
_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 16: 8}


def _tags(data: bytes) -> dict[int, tuple]:
    """The first IFD's tags of a classic little-endian TIFF (values of the types needed)."""
    (count,) = struct.unpack_from("<H", data, struct.unpack_from("<I", data, 4)[0])
    base = struct.unpack_from("<I", data, 4)[0] + 2
    tags: dict[int, tuple] = {}
    for k in range(count):
        tag, kind, n, value = struct.unpack_from("<HHI4s", data, base + 12 * k)
        if kind not in _FMT:
            tags[tag] = ()
            continue
        size = _SIZE[kind] * n
        raw = value[:size] if size <= 4 else data[_u32(value) : _u32(value) + size]
        if len(raw) < size:
            raise ValueError(f"tag {tag} runs past the end of the file")
        tags[tag] = (
            (raw.rstrip(b"\0").decode("latin-1"),)
            if kind == 2
            else struct.unpack(f"<{n}{_FMT[kind]}", raw)
        )
    return tags


def _u32(b: bytes) -> int:
    return struct.unpack("<I", b)[0]


def _fast_tiff(data: bytes) -> np.ndarray | None:
    """Pixels of a plain 8-bit one-band TIFF, or None when it is not one (the general
    decoder then reads it)."""
    if data[:4] != b"II*\0":
        return None
    t = _tags(data)
    one = lambda tag, default=None: t.get(tag, (default,))[0] if t.get(tag) != () else None  # noqa: E731
    comp = one(COMPRESSION, 1)
    if (
        one(BITS, 1) != 8
        or one(SAMPLES, 1) != 1
        or one(SAMPLE_FORMAT, 1) != 1
        or one(PHOTOMETRIC) != 1
        or one(PLANAR, 1) != 1
        or one(PREDICTOR, 1) != 1
        or EXTRA_SAMPLES in t
        or comp not in (1, 8, 32946, 50000)
    ):
        return None
    nodata = t.get(GDAL_NODATA)
    if nodata:
        try:
            if float(nodata[0]) != 0:
                return None  # tileread's rule for other tags (true zeros -> 1)
        except ValueError:
            return None
    w, h = one(WIDTH), one(HEIGHT)
    if not w or not h:
        return None
    if TILE_OFFSETS in t:
        bw, bh = one(TILE_W), one(TILE_H)
        offsets, counts = t[TILE_OFFSETS], t.get(TILE_COUNTS, ())
    else:
        bw, bh = w, min(one(ROWS_PER_STRIP, h) or h, h)
        offsets, counts = t.get(STRIP_OFFSETS, ()), t.get(STRIP_COUNTS, ())
    across, down = -(-w // bw), -(-h // bh)
    if not bw or not bh or len(offsets) != across * down or len(counts) != len(offsets):
        return None
    out = np.empty((down * bh, across * bw), np.uint8)
    if comp == 50000:
        import zstandard

        unzstd = zstandard.ZstdDecompressor()
    for k, (off, n) in enumerate(zip(offsets, counts, strict=True)):
        raw = data[off : off + n]
        if len(raw) < n:
            raise ValueError(f"block {k} runs past the end of the file")
        if comp == 50000:
            raw = unzstd.decompress(raw, max_output_size=bw * bh)
        elif comp in (8, 32946):
            raw = zlib.decompress(raw)
        r, c = divmod(k, across)
        rows = bh if TILE_OFFSETS in t else min(bh, h - r * bh)
        block = np.frombuffer(raw, np.uint8, count=rows * bw).reshape(rows, bw)
        out[r * bh : r * bh + rows, c * bw : (c + 1) * bw] = block
    return out[:h, :w]


def decode_u8(data: bytes, name: str) -> np.ndarray:
    """2-D uint8 grey of an encoded tile (`name` gives the suffix and the messages);
    tileread's pixels, by its rule. Raises TileReadError with a one-line reason."""
    from sarkit.raster.tileread import decode_gray

    if not data:
        raise TileReadError(f"{name}: empty file (0 bytes)")
    try:
        gray = _fast_tiff(data)
    except Exception:  # noqa: BLE001 - a damaged file: named below by the decoders
        gray = None
    if gray is not None:
        return gray
    return decode_gray(lambda: io.BytesIO(data), name)


def read_tile_u8(path: Path) -> np.ndarray:
    """A tile file's uint8 grey (one read, then `decode_u8`); errors as tileread's."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TileReadError(f"{path}: tile not found") from None
    except IsADirectoryError:
        raise TileReadError(f"{path}: is a folder, not a tile") from None
    except OSError as exc:
        raise TileReadError(f"{path}: cannot read ({_one_line(exc)})") from None
    return decode_u8(data, str(path))
