"""The pretraining loader: image-text pairs from a record table, a batch per call.

:class:`PairDataset` reads tiles from files or tar shards (``sarkit.train.shards``) through
the fast decoder (``sarkit.train.tiles``), augments each with the same seeded crop, flip
and turn as ``TileDataset`` (same generator, same draws, same pixels), and builds a whole
batch in ``__getitems__``: the tokens come padded from the table's columns (tokenised once
per dataset, see ``sarkit.train.table``), MLM eligibility from a bit mask, one stack of
images. The DataLoader calls ``__getitems__`` with a batch's indices; the collate function
(:func:`passthrough`) has nothing left to do. A batch equals ``ImageTextCollate``'s for
the same records (tested), so a run's losses do not depend on which pipeline fed it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sarkit.errors import SarkitError
from sarkit.train.data import Augment, TileImages, resolve_path
from sarkit.train.table import PairTable


class PairDataset(TileImages, torch.utils.data.Dataset):
    """A record table's (image, text) pairs; ``__getitems__`` returns a collated batch."""

    def __init__(
        self,
        table: PairTable,
        image_size: int,
        base: Path | None = None,
        augment: Augment | None = None,
        seed: int = 0,
        mean: float = 0.5,
        std: float = 0.5,
        center_crop: float = 1.0,
        pad_id: int = 0,
    ):
        super().__init__(image_size, base, augment, seed, mean, std, center_crop)
        self.table = table
        self.pad_id = int(pad_id)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.table)

    # -- pixels -----------------------------------------------------------------------

    def _shard_bytes(self, index: int) -> tuple[bytes, str]:
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        cols = self.table.columns
        shard = int(cols["shard"][index])
        path = self.table.shards[shard]
        name = f"{path}:{self.table.path(index)}"
        fd = self._fds.get(shard)
        try:
            if fd is None:
                fd = self._fds[shard] = os.open(path, os.O_RDONLY)
            size = int(cols["size"][index])
            data = os.pread(fd, size, int(cols["offset"][index]))
        except OSError as exc:
            raise SarkitError(f"{name}: cannot read ({exc.strerror})") from None
        if len(data) != size:
            raise SarkitError(f"{name}: shard truncated ({len(data)} of {size} bytes)")
        return data, name

    def read_u8(self, index: int) -> np.ndarray:
        """The tile of record `index` as uint8 grey (tileread's pixels)."""
        from sarkit.train.tiles import decode_u8, read_tile_u8

        try:
            if self.table.shards:
                data, name = self._shard_bytes(index)
                return decode_u8(data, name)
            return read_tile_u8(resolve_path(self.table.path(index), self.base))
        except SarkitError as exc:
            raise SarkitError(f"record {self.table.id(index)}: {exc}") from None

    def read(self, index: int) -> np.ndarray:
        """float32 in [0, 1], as ``read_gray``."""
        return self.read_u8(index).astype(np.float32) / np.float32(255.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image(index)

    # -- batches ----------------------------------------------------------------------

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        images, index = [], []
        for i in indices:
            x, got = self.image(int(i))
            images.append(x)
            index.append(got)
        return {"images": torch.stack(images), **self.texts(index)}

    def texts(self, index: list[int]) -> dict[str, torch.Tensor]:
        """Padded tokens, segment ids, MLM eligibility, index and groups of the records."""
        cols = self.table.columns
        idx = np.asarray(index, np.int64)
        off = cols["tok_off"]
        starts, ends = off[idx], off[idx + 1]
        lengths = ends - starts
        width = int(lengths.max())
        n = len(idx)
        ids = np.full((n, width), self.pad_id, np.int64)
        segs = np.full((n, width), -1, np.int64)
        mask = np.arange(width)[None, :] < lengths[:, None]
        flat = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)])
        ids[mask] = cols["tokens"][flat]
        segs[mask] = cols["segs"][flat]
        exclude = cols["exclude"][idx].astype(np.uint64)
        bit = np.left_shift(np.uint64(1), np.maximum(segs - 1, 0).astype(np.uint64))
        excluded = (segs >= 1) & ((exclude[:, None] & bit) != 0)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "segment_ids": torch.from_numpy(segs),
            "mlm_eligible": torch.from_numpy(~excluded),
            "index": torch.from_numpy(idx),
            "groups": torch.from_numpy(np.asarray(cols["group"][idx], np.int64)),
        }

    def pixel_stats(self, n: int = 256, seed: int = 0) -> tuple[float, float]:
        """``sarkit.train.data.pixel_stats`` over the table: the same sample, same figures."""
        rng = np.random.default_rng(seed)
        total = len(self)
        pick = rng.permutation(total)[:n] if total > n else range(total)
        means, variances = [], []
        for i in pick:
            try:
                arr = self.read(int(i))
            except SarkitError:
                continue
            means.append(float(arr.mean()))
            variances.append(float(arr.var()))
        if not means:
            first = int(list(pick)[0])
            raise SarkitError(
                f"none of {len(pick)} sampled tiles can be read (first: {self.table.path(first)})"
            )
        mean = float(np.mean(means))
        std = float(np.sqrt(np.mean(variances) + np.var(means)))
        return mean, max(std, 1e-3)


def passthrough(batch: Any) -> Any:
    """The collate function of a dataset whose ``__getitems__`` already collates."""
    return batch
