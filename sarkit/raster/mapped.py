"""Quantising tiles of an uncompressed GeoTIFF straight from the page cache.

GDAL reads a window by copying each block from the page cache into a buffer of its own and
then into the window's array: two copies of 4 MB for a 1024-px float32 tile, a third of
the tile's work once the quantiser is a table lookup. In an uncompressed little-endian
GeoTIFF the blocks' bytes are the pixels, so the lookup kernel (sarkit/raster/_lut.c) reads
them where the kernel keeps them, through a short-lived read-only memory map of each run of
adjacent blocks, and writes the tile's bytes directly: no copy of the raw pixels at all.
Anything else (compression, a big-endian file, pixel-interleaved bands, packed bit depths,
a window over the scene's edge, a scene without the C kernel) is read through GDAL.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from sarkit.raster import quantise
from sarkit.raster.prefetch import BlockIndex

_GRANULE = mmap.ALLOCATIONGRANULARITY
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault the run in with one call


class MappedBand:
    """One band of an uncompressed GeoTIFF whose blocks the lookup kernel reads in place."""

    def __init__(self, path: Path, index: BlockIndex, dtype: np.dtype, width: int, height: int):
        self.path, self.index, self.dtype = path, index, dtype
        self.width, self.height = width, height
        self.bits, _, self.param = quantise.KERNELS[dtype.str]
        self.rect = getattr(quantise._lut, f"rect{self.bits}")
        self._fd: int | None = None
        self._pid = 0

    @classmethod
    def probe(cls, ds, band: int, index: BlockIndex | None) -> MappedBand | None:
        """The band, if its bytes on disk are exactly its pixels; None otherwise."""
        dtype = np.dtype(ds.dtypes[band - 1])
        if (
            index is None
            or quantise._lut is None
            or dtype.str not in quantise.KERNELS
            or ds.compression is not None
            or (ds.count > 1 and ds.interleaving and ds.interleaving.value != "BAND")
            or ds.tags(ns="IMAGE_STRUCTURE").get("NBITS") not in (None, str(8 * dtype.itemsize))
        ):
            return None
        with open(ds.name, "rb") as fh:
            if fh.read(2) != b"II":  # big-endian TIFF: bytes are not native values
                return None
            file_size = os.fstat(fh.fileno()).st_size
        offsets, sizes = np.array(index.offsets, np.int64), np.array(index.sizes, np.int64)
        row_bytes = index.block_w * dtype.itemsize
        rows = np.minimum(index.block_h, ds.height - index.block_h * np.arange(len(offsets)))
        # tiles are always whole blocks; the last strip may be shorter; a block past the end
        # of a truncated file must stay GDAL's error, not a fault in a map
        whole = (sizes == index.block_h * row_bytes) | (sizes == (rows * row_bytes)[:, None])
        if not (whole.all() and (offsets > 0).all() and (offsets + sizes <= file_size).all()):
            return None
        return cls(Path(ds.name), index, dtype, ds.width, ds.height)

    def _file(self) -> int:
        """This process's own descriptor (forked workers must not share a file offset)."""
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def gather(
        self, col_off: int, row_off: int, width: int, height: int, lut: np.ndarray
    ) -> tuple[np.ndarray, int] | None:
        """The window's table bytes and how many are 0; None if it is not wholly inside."""
        if col_off < 0 or row_off < 0 or col_off + width > self.width:
            return None
        if row_off + height > self.height:
            return None
        index, item = self.index, self.dtype.itemsize
        bh, bw = index.block_h, index.block_w
        out = np.empty((height, width), np.uint8)
        zeros, fd = 0, self._file()
        block_rows, block_cols = index.block_span(col_off, row_off, width, height)
        flags = mmap.MAP_SHARED | _POPULATE
        for br in block_rows:
            r0, r1 = max(row_off, br * bh), min(row_off + height, (br + 1) * bh)
            for run in index.row_runs(br, block_cols):  # one map per run of adjacent blocks
                start = index.offsets[br][run.start]
                base = start - start % _GRANULE
                end = index.offsets[br][run[-1]] + index.sizes[br][run[-1]]
                with mmap.mmap(fd, end - base, flags, mmap.PROT_READ, offset=base) as mm:
                    for bc in run:
                        c0, c1 = max(col_off, bc * bw), min(col_off + width, (bc + 1) * bw)
                        src = index.offsets[br][bc] - base
                        src += ((r0 - br * bh) * bw + (c0 - bc * bw)) * item
                        dst = (r0 - row_off) * width + (c0 - col_off)
                        zeros += self.rect(
                            mm, src, r1 - r0, c1 - c0, bw * item, lut, self.param, out, dst, width
                        )
        return out, zeros
