"""Asking the kernel for a tile's blocks before a worker reads them.

A tile window of a block-tiled GeoTIFF is a handful of short runs of bytes scattered over
the file (one run per block row), so the kernel's sequential read-ahead never kicks in and
every worker waits on the disk at each tile with its core idle. Here a background thread
looks up where the next tiles' blocks lie (GDAL's ``BLOCK_OFFSET_x_y`` items) and advises
the kernel to read them (``posix_fadvise(WILLNEED)``): the reads happen while the workers
quantise and encode, and reach them from the page cache. The look-ahead is a few tiles, so
the page cache it fills stays small whatever the scene size. Formats other than GeoTIFF, or
a file without block offsets, are simply not prefetched.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterable
from pathlib import Path

#: the kernel advice this rests on (Linux and most Unixes; not macOS or Windows)
SUPPORTED = hasattr(os, "posix_fadvise")
#: one advice call per this many bytes at most (the kernel caps one call's read-ahead)
CHUNK = 4 << 20


class BlockIndex:
    """Byte ranges of one band's blocks in a GeoTIFF."""

    def __init__(
        self, offsets: list[list[int]], sizes: list[list[int]], block_h: int, block_w: int
    ):
        self.offsets, self.sizes = offsets, sizes
        self.block_h, self.block_w = block_h, block_w

    @classmethod
    def read(cls, ds, band: int) -> BlockIndex | None:
        """From an open dataset; None where it is not a GeoTIFF or has no block offsets."""
        if ds.driver != "GTiff" or not ds.block_shapes:
            return None
        block_h, block_w = ds.block_shapes[band - 1]
        rows, cols = -(-ds.height // block_h), -(-ds.width // block_w)
        offsets = [[0] * cols for _ in range(rows)]
        sizes = [[0] * cols for _ in range(rows)]
        for r in range(rows):
            for c in range(cols):
                offset = ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=band)
                size = ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=band)
                if offset is None or size is None:
                    return None
                offsets[r][c], sizes[r][c] = int(offset), int(size)
        return cls(offsets, sizes, block_h, block_w)

    def block_span(
        self, col_off: int, row_off: int, width: int, height: int
    ) -> tuple[range, range]:
        """The window's block rows and block columns (clipped to the scene's blocks)."""
        rows, cols = len(self.offsets), len(self.offsets[0])
        r0, c0 = max(row_off, 0) // self.block_h, max(col_off, 0) // self.block_w
        r1 = min((row_off + height - 1) // self.block_h, rows - 1)
        c1 = min((col_off + width - 1) // self.block_w, cols - 1)
        return range(r0, r1 + 1), range(c0, c1 + 1)

    def row_runs(self, r: int, cols: range) -> list[range]:
        """Block columns of block row `r` in `cols`, grouped into runs whose bytes follow
        one another in the file (sparse blocks, with nothing on disk, left out)."""
        runs: list[range] = []
        offsets, sizes = self.offsets[r], self.sizes[r]
        for c in cols:
            if sizes[c] <= 0:
                continue
            if runs and offsets[runs[-1][-1]] + sizes[runs[-1][-1]] == offsets[c]:
                runs[-1] = range(runs[-1].start, c + 1)
            else:
                runs.append(range(c, c + 1))
        return runs

    def ranges(self, col_off: int, row_off: int, width: int, height: int) -> list[tuple[int, int]]:
        """(offset, length) runs of bytes holding a window, adjacent blocks merged."""
        rows, cols = self.block_span(col_off, row_off, width, height)
        runs: list[tuple[int, int]] = []
        for r in rows:
            for run in self.row_runs(r, cols):
                offset = self.offsets[r][run.start]
                end = self.offsets[r][run[-1]] + self.sizes[r][run[-1]]
                if runs and runs[-1][0] + runs[-1][1] == offset:  # the next row follows on
                    runs[-1] = (runs[-1][0], end - runs[-1][0])
                else:
                    runs.append((offset, end - offset))
        return runs


def advise(fd: int, runs: Iterable[tuple[int, int]]) -> None:
    """Start the kernel reading these byte runs into the page cache; returns before they land."""
    for offset, length in runs:
        for start in range(offset, offset + length, CHUNK):
            os.posix_fadvise(fd, start, min(CHUNK, offset + length - start), os.POSIX_FADV_WILLNEED)


class Prefetcher:
    """A background thread that advises the kernel of windows shortly before they are read.

    ``want(window)`` queues a window (col_off, row_off, width, height) and returns at once;
    the thread advises each queued window in order. ``close()`` stops it.
    """

    def __init__(self, path: Path, index: BlockIndex) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.index = index
        self.windows: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="sarkit-prefetch", daemon=True)
        self.thread.start()

    def want(self, window: tuple[int, int, int, int]) -> None:
        self.windows.put(window)

    def advise_now(self, windows: Iterable[tuple[int, int, int, int]]) -> None:
        """Advise these windows from the calling thread, before anything queued."""
        with contextlib.suppress(OSError):
            for window in windows:
                advise(self.fd, self.index.ranges(*window))

    def close(self) -> None:
        self.windows.put(None)
        self.thread.join()
        os.close(self.fd)

    def _run(self) -> None:
        while (window := self.windows.get()) is not None:
            try:
                advise(self.fd, self.index.ranges(*window))
            except OSError:  # advice is best effort: a failure only costs speed
                pass
