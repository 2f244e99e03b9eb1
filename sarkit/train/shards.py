"""Tar shards in WebDataset's layout: many tiles in a few large files, for cluster file
systems on which a million small files are slow to list, open and stat.

A shard is a plain POSIX tar. Sample k of the records is two consecutive members with one
key (WebDataset's convention: the name up to the first dot)::

    000000012.json    the record, as it was in the JSON Lines file
    000000012.tif     its tile's bytes (the suffix of the record's path: .tif, .jpeg, ...)

so ``webdataset.WebDataset("shards/{000000..000009}.tar")`` reads them too. sarkit reads
shards by random access instead of streaming them: the members are indexed once (the
index lives in the token cache beside the shards) and each tile is one ``pread`` at its
offset. The loader then draws the same seeded per-epoch permutation as for records on
files, so ``sarkit pretrain shards/*.tar`` trains on exactly the samples, in the same
order, that the records file it was made from gives, and ``--resume`` stays exact.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from sarkit import log
from sarkit.errors import SarkitError

IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


def write_shards(
    records_path: Path, out: Path, per_shard: int = 2000, prefix: str = "shard"
) -> tuple[int, int, int]:
    """Write the records of a JSON Lines file and their tiles as shards into `out`.

    Returns (records written, shards, records skipped). A record whose tile cannot be read
    is named on stderr and left out (counted); each shard is written under a temporary
    name and renamed when complete.
    """
    from sarkit.atomic import atomic_path
    from sarkit.records import read_records
    from sarkit.train.data import resolve_path

    if per_shard < 1:
        raise SarkitError(f"--per-shard {per_shard}: must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    base = records_path.parent
    written = skipped = shards = 0
    tar = tmp_ctx = None
    try:
        for item in read_records([str(records_path)], None, ("id", "path")):
            rec = item.record
            path = resolve_path(str(rec["path"]), base)
            try:
                data = path.read_bytes()
            except OSError as exc:
                skipped += 1
                log.warn(f"skipped: {item.source}:{item.line} ({item.id}): {path}: "
                         f"{exc.strerror or type(exc).__name__}")  # fmt: skip
                continue
            if tar is None:
                tmp_ctx = atomic_path(out / f"{prefix}-{shards:06d}.tar", fsync=False)
                tar = tarfile.open(tmp_ctx.__enter__(), "w", format=tarfile.USTAR_FORMAT)
            key = f"{written:09d}"
            suffix = path.suffix.lower() if path.suffix.lower() in IMAGE_SUFFIXES else ".tif"
            for name, payload in (
                (key + ".json", json.dumps(rec, ensure_ascii=False).encode("utf-8")),
                (key + suffix, data),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))
            written += 1
            if written % per_shard == 0:
                tar.close()
                tmp_ctx.__exit__(None, None, None)
                tar = tmp_ctx = None
                shards += 1
        if tar is not None:
            tar.close()
            tmp_ctx.__exit__(None, None, None)
            tar = tmp_ctx = None
            shards += 1
    except BaseException as exc:
        if tar is not None:
            tar.close()
            tmp_ctx.__exit__(type(exc), exc, None)
        raise
    return written, shards, skipped


def shard_items(paths: Sequence[Path]) -> Iterator[tuple[dict, str, tuple[int, int, int]]]:
    """(record, 'shard:member', (shard number, tile offset, tile size)) for every sample.

    A shard that is not a readable tar is an error naming it; a sample without a record
    or a tile, or with a record that is not JSON, is named on stderr and skipped.
    """
    for number, path in enumerate(paths):
        try:
            size = path.stat().st_size
            with tarfile.open(path, "r:") as tar:
                yield from _samples(tar, path, number, size)
        except (tarfile.TarError, EOFError, OSError) as exc:
            why = " ".join(str(exc).split()) or type(exc).__name__
            raise SarkitError(
                f"{path}: damaged shard ({why}); write it again (sarkit shard)"
            ) from None


def _samples(tar: tarfile.TarFile, path: Path, number: int, size: int):
    key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        name = member.name.rsplit("/", 1)[-1]
        k, _, ext = name.partition(".")
        if k != key:
            if key is not None:
                got = _sample(tar, path, number, size, key, members)
                if got is not None:
                    yield got
            key, members = k, {}
        members["." + ext.lower()] = member
    if key is not None:
        got = _sample(tar, path, number, size, key, members)
        if got is not None:
            yield got


def _sample(tar, path: Path, number: int, size: int, key: str, members: dict):
    where = f"{path}:{key}"
    meta = members.get(".json")
    image = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
    if meta is None or image is None:
        log.warn(f"skipped: {where}: no {'record (.json)' if meta is None else 'tile'} member")
        return None
    if image.offset_data + image.size > size:
        raise tarfile.ReadError(f"member {image.name} runs past the end of the file")
    try:
        rec = json.loads(tar.extractfile(meta).read().decode("utf-8"))
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        log.warn(f"skipped: {where}: record is not valid JSON ({type(exc).__name__})")
        return None
    rec = dict(rec, path=image.name)
    return rec, where, (number, image.offset_data, image.size)
