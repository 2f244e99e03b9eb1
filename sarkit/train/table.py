"""Training records as compact, memory-mapped columns, with their texts tokenised once.

A captioned record is some 4 KB of JSON and about 15 KB as a Python dict; a million of
them held per rank (and touched again by every DataLoader worker) are some 15 GB. What a
pretraining step needs of a record is much smaller: its tile (path, or where it lies in a
tar shard), its token ids and segment ids (already fitted to ``max_tokens``), its group
and which segments MLM must skip. :func:`open_table` streams the records once into those
columns, as numpy ``.npy`` files in a cache folder beside the records, and maps them
read-only: every worker shares the same pages, and a rank's memory no longer grows with
the dataset's JSON.

The cache is keyed by what its content depends on: the tokenizer (its full definition,
vocabulary included), the field order, ``max_tokens`` and every source file's size and
modification time; any change makes a new one. It is written to a temporary folder and
renamed into place, so a crash never leaves a half cache under the final name; a damaged
one (a file missing, truncated or not a .npy) is named on stderr and rebuilt.

Columns (n records; ``*_off`` are n + 1 offsets into a flat array)::

    id, id_off         uint8 UTF-8 bytes of the record ids (for messages)
    path, path_off     the tile path as written in the record (or the shard member name)
    tokens, tok_off    token ids ([CLS] seg1 [SEP] ... [SEP], as TextCodec.encode writes)
    segs               segment id of every token (0 [CLS], j + 1 segment j)
    group              int64: records of one ``group`` share a number (names sorted, as
                       ImageTextCollate numbers them), a record without one is -1 - index
    exclude            uint64 bit j set: field j is in the record's ``mlm_exclude``
    shard, offset, size  (shards only) the tar file, byte offset and length of the tile
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sarkit import log
from sarkit.errors import SarkitError

FORMAT = 1
CHUNK = 4096  # records tokenised per batched tokenizer call
KNOWN_TEXTS = 20_000  # segment texts remembered across chunks (repeated ones are common)
COLUMNS = ("id", "id_off", "path", "path_off", "tokens", "tok_off", "segs", "group", "exclude")
SHARD_COLUMNS = ("shard", "offset", "size")


def unusable(record: dict) -> str | None:
    """Why an image-text stage cannot train on a record (None: it can)."""
    quality = record.get("quality") if isinstance(record.get("quality"), dict) else {}
    caption = record.get("caption") if isinstance(record.get("caption"), dict) else {}
    if quality.get("keep") is False:
        return "dropped"
    if caption.get("failed"):
        return "failed"
    texts = record.get("texts")
    if not (
        isinstance(texts, dict) and any(isinstance(v, str) and v.strip() for v in texts.values())
    ):
        return "empty"  # a number or a list in `texts` is not a caption
    return None


@dataclass
class Skips:
    """Records left out of training, counted by reason, and the first one's place."""

    dropped: int = 0
    failed: int = 0
    empty: int = 0
    damaged: int = 0
    first: str | None = None

    @classmethod
    def from_meta(cls, saved: dict) -> Skips:
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__ if k in saved})

    def meta(self) -> dict:
        return dict(self.__dict__)

    def add(self, why: str, where: str) -> None:
        setattr(self, why, getattr(self, why) + 1)
        self.first = self.first or where

    def parts(self) -> list[str]:
        parts = []
        if self.damaged:
            parts.append(f"{self.damaged} damaged line(s)")
        if self.failed:
            parts.append(f"{self.failed} failed caption(s)")
        if self.empty:
            parts.append(f"{self.empty} without texts")
        if self.dropped:
            parts.append(f"{self.dropped} dropped by filter")
        return parts

    def report(self, source: str, kept: int, strict: bool) -> None:
        """The same messages as ``usable_records``: counted on stderr, or an error."""
        parts = self.parts()
        if parts and strict:
            raise SarkitError(
                f"{source}: {', '.join(parts)} (first: {self.first}); --strict stops here, "
                "drop --strict to skip them"
            )
        if not kept:
            why = f" ({', '.join(parts)}; first: {self.first})" if parts else ""
            raise SarkitError(f"{source}: no record with usable texts to train on{why}")
        if parts:
            log.warn(f"skipped: {', '.join(parts)}; training on {kept} records")


# ---------------------------------------------------------------- the table


class PairTable:
    """The columns of a record table (memory-mapped when loaded from a cache folder)."""

    def __init__(self, columns: dict[str, np.ndarray], meta: dict):
        self.columns = columns
        self.meta = meta
        self.shards = [Path(p) for p in meta.get("shards", [])]

    def __len__(self) -> int:
        return len(self.columns["group"])

    def _text(self, name: str, i: int) -> str:
        off = self.columns[name + "_off"]
        return bytes(self.columns[name][off[i] : off[i + 1]]).decode("utf-8")

    def id(self, i: int) -> str:
        return self._text("id", i)

    def path(self, i: int) -> str:
        return self._text("path", i)

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        off = self.columns["tok_off"]
        a, b = int(off[i]), int(off[i + 1])
        return self.columns["tokens"][a:b], self.columns["segs"][a:b]


class _Column:
    """A column appended chunk by chunk to a raw file, made a .npy at the end (no chunk
    stays in memory: a million records' tokens are hundreds of MB)."""

    def __init__(self, folder: Path, name: str, dtype: Any):
        self.path = folder / f"{name}.npy"
        self.raw = folder / f".{name}.raw"
        self.dtype = np.dtype(dtype)
        self.fh = open(self.raw, "wb")  # noqa: SIM115 - closed in finish()
        self.n = 0

    def append(self, values: Any) -> None:
        arr = np.ascontiguousarray(np.asarray(values, dtype=self.dtype))
        self.fh.write(arr.tobytes())
        self.n += arr.size

    def finish(self, remap: np.ndarray | None = None) -> None:
        self.fh.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.n,)}  # fmt: skip
        with open(self.path, "wb") as out, open(self.raw, "rb") as src:
            np.lib.format.write_array_header_1_0(out, header)
            step = 1 << 22
            while True:
                buf = src.read(step * self.dtype.itemsize)
                if not buf:
                    break
                if remap is not None:
                    buf = remap(np.frombuffer(buf, self.dtype)).astype(self.dtype).tobytes()
                out.write(buf)
        self.raw.unlink()


class _Builder:
    """Streams records into the columns of a table folder (see the module doc)."""

    def __init__(self, folder: Path, codec: Any, with_shards: bool):
        self.folder = folder
        self.codec = codec
        vocab = len(codec.tokenizer)
        self.tok_dtype = np.uint16 if vocab <= 65535 else np.int32
        if len(codec.fields) > 64:
            raise SarkitError(f"{len(codec.fields)} text fields: at most 64 are supported")
        kinds = {"id": np.uint8, "id_off": np.int64, "path": np.uint8, "path_off": np.int64,
                 "tokens": self.tok_dtype, "tok_off": np.int64, "segs": np.int8,
                 "group": np.int64, "exclude": np.uint64}  # fmt: skip
        if with_shards:
            kinds.update(shard=np.int32, offset=np.int64, size=np.int64)
        self.cols = {name: _Column(folder, name, dtype) for name, dtype in kinds.items()}
        for name in ("id_off", "path_off", "tok_off"):
            self.cols[name].append([0])
        self.ends = {"id": 0, "path": 0, "tokens": 0}
        self.groups: dict[str, int] = {}
        self.n = 0
        self.pending: list[tuple[dict, tuple | None]] = []
        self.known: dict[str, list[int]] = {}  # segment text -> ids ("No water bodies.")

    def add(self, record: dict, where: tuple | None = None) -> None:
        self.pending.append((record, where))
        if len(self.pending) >= CHUNK:
            self.flush()

    def _blob(self, name: str, values: list[str]) -> None:
        data = [v.encode("utf-8") for v in values]
        lengths = np.fromiter((len(d) for d in data), np.int64, len(data))
        self.cols[name].append(np.frombuffer(b"".join(data), np.uint8))
        self.cols[name + "_off"].append(self.ends[name] + np.cumsum(lengths))
        self.ends[name] += int(lengths.sum())

    def flush(self) -> None:
        if not self.pending:
            return
        codec = self.codec
        records = [r for r, _ in self.pending]
        segs = [codec.segments(r["texts"]) for r in records]
        known = {s: self.known[s] for row in segs for s in row if s in self.known}
        unique = sorted({s for row in segs for s in row if s and s not in known})
        ids = codec.tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
        known.update(zip(unique, ids, strict=True))
        if len(self.known) + len(unique) > KNOWN_TEXTS:  # bounded: unique texts never repeat
            self.known.clear()
        self.known.update(zip(unique, ids, strict=True))
        tokens, sids, lengths = [], [], []
        for row in segs:
            pieces = codec._fit([known.get(s, []) for s in row]) if row else []
            t, g = [codec.cls_id], [0]
            for j, piece in enumerate(pieces):
                t += piece + [codec.sep_id]
                g += [j + 1] * (len(piece) + 1)
            if len(t) == 1:
                t, g = [codec.cls_id, codec.sep_id], [0, 0]
            tokens += t
            sids += g
            lengths.append(len(t))
        self.cols["tokens"].append(np.asarray(tokens, np.int64).astype(self.tok_dtype))
        self.cols["segs"].append(sids)
        self.ends["tokens"] += len(tokens)
        self.cols["tok_off"].append(self.ends["tokens"] - len(tokens) + np.cumsum(lengths))
        self._blob("id", [str(r.get("id")) for r in records])
        self._blob("path", [str(r.get("path")) for r in records])
        groups, excludes = [], []
        fields = codec.fields
        for k, r in enumerate(records):
            name = r.get("group")
            if name is None:
                groups.append(-1 - (self.n + k))
            else:
                groups.append(self.groups.setdefault(str(name), len(self.groups)))
            bits = 0
            for f in r.get("mlm_exclude") or ():
                if f in fields:
                    bits |= 1 << fields.index(f)
            excludes.append(bits)
        self.cols["group"].append(groups)
        self.cols["exclude"].append(np.asarray(excludes, np.uint64))
        if "shard" in self.cols:
            where = [w for _, w in self.pending]
            for k, name in enumerate(SHARD_COLUMNS):
                self.cols[name].append([w[k] for w in where])
        self.n += len(records)
        self.pending = []

    def finish(self) -> int:
        self.flush()
        # group numbers by sorted name (ImageTextCollate's numbering; the losses compare
        # groups for equality only, but the same numbers keep runs comparable bit for bit)
        order = sorted(self.groups, key=str)
        remap = np.empty(len(order), np.int64)
        for rank, name in enumerate(order):
            remap[self.groups[name]] = rank

        def regroup(values: np.ndarray) -> np.ndarray:
            out = values.copy()
            named = values >= 0
            out[named] = remap[values[named]]
            return out

        for name, col in self.cols.items():
            col.finish(regroup if name == "group" else None)
        return self.n


# ---------------------------------------------------------------- the cache


def tokenizer_digest(tokenizer: Any) -> str:
    """A digest of the tokenizer's whole definition (vocabulary, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the call-time settings a tokenising call changes
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((type(tokenizer).__name__ + special + text).encode()).hexdigest()


def cache_key(sources: Sequence[Path], codec: Any, kind: str) -> dict:
    """What a cache's content depends on; its sha256 names the folder."""
    stats = []
    for p in sources:
        st = p.stat()
        stats.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return {
        "format": FORMAT,
        "kind": kind,
        "tokenizer": tokenizer_digest(codec.tokenizer),
        "fields": list(codec.fields),
        "max_tokens": codec.max_tokens,
        "sources": stats,
    }


def cache_folder(sources: Sequence[Path], key: dict, fallback: Path | None) -> Path:
    """``.sarkit-cache/<name>-<key>/`` beside the first source, or under `fallback` when
    that folder cannot be written (a read-only dataset)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    first = sources[0]
    name = (
        f"{first.stem}-{digest}"
        if len(sources) == 1
        else f"{first.stem}+{len(sources) - 1}-{digest}"
    )
    root = first.parent / ".sarkit-cache"
    if not os.access(first.parent, os.W_OK) and fallback is not None:
        root = fallback / "data-cache"
    return root / name


def load_table(folder: Path, key: dict | None = None) -> PairTable:
    """A cache folder's columns, memory-mapped; SarkitError naming the damaged file."""
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise SarkitError(f"{meta_path}: damaged token cache ({type(exc).__name__})") from None
    if key is not None and meta.get("key") != key:
        raise SarkitError(f"{meta_path}: token cache of other records or another tokenizer")
    names = COLUMNS + (SHARD_COLUMNS if meta.get("shards") else ())
    columns = {}
    for name in names:
        path = folder / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SarkitError(f"{path}: damaged token cache ({_short(exc)})") from None
        columns[name] = arr
    n = int(meta.get("n", -1))
    expect = {"group": n, "exclude": n, "id_off": n + 1, "path_off": n + 1, "tok_off": n + 1}
    for name in SHARD_COLUMNS if meta.get("shards") else ():
        expect[name] = n
    for name, size in expect.items():
        if len(columns[name]) != size:
            raise SarkitError(f"{folder / (name + '.npy')}: damaged token cache (length)")
    for name, off in (("id", "id_off"), ("path", "path_off"), ("tokens", "tok_off")):
        if int(columns[off][-1]) != len(columns[name]):
            raise SarkitError(f"{folder / (name + '.npy')}: damaged token cache (length)")
    if len(columns["segs"]) != len(columns["tokens"]):
        raise SarkitError(f"{folder / 'segs.npy'}: damaged token cache (length)")
    return PairTable(columns, meta)


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def build_table(
    folder: Path,
    items: Iterable[tuple[dict, str, tuple | None]],
    codec: Any,
    key: dict,
    shards: Sequence[Path] = (),
) -> None:
    """Write a table folder atomically from (record, where for messages, shard location)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.partial"
    tmp.mkdir()
    try:
        builder = _Builder(tmp, codec, bool(shards))
        skips = Skips()
        for record, where, loc in items:
            if record is None:  # a line that is no record: named by jsonl_items
                skips.add("damaged", where)
                continue
            why = unusable(record)
            if why:
                skips.add(why, where)
                continue
            builder.add(record, loc)
        n = builder.finish()
        meta = {"key": key, "n": n, "shards": [str(p) for p in shards], "skips": skips.meta()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            try:
                load_table(folder, key)
                return  # another process (a node's first rank) made the same table meanwhile
            except SarkitError:
                shutil.rmtree(folder, ignore_errors=True)  # the damaged one
        try:
            os.replace(tmp, folder)
        except OSError:  # another process renamed its own (equal) table there meanwhile
            if not (folder / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_table(
    sources: Sequence[Path],
    items: Any,
    codec: Any,
    kind: str,
    source_name: str,
    strict: bool = False,
    fallback: Path | None = None,
) -> PairTable:
    """The cached table of `sources` (built from ``items()`` when missing or damaged);
    skipped records are counted on stderr as ``usable_records`` counts them."""
    key = cache_key(sources, codec, kind)
    folder = cache_folder(sources, key, fallback)
    table = None
    if (folder / "meta.json").exists() or folder.exists():
        try:
            table = load_table(folder, key)
        except SarkitError as exc:
            log.warn(f"{exc}; rebuilding it")
    if table is None and _follower():
        table = _wait_for(folder, key)
    if table is None:
        log.info(f"tokenising {source_name} once into {folder}")
        build_table(folder, items(), codec, key, [s for s in sources] if kind == "shards" else ())
        table = load_table(folder, key)
    s = table.meta.get("skips", {})
    Skips.from_meta(s).report(source_name, len(table), strict)
    return table


def _follower() -> bool:
    """A process that is not its node's first: it waits for that one's table."""
    local = os.environ.get("LOCAL_RANK")
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and local not in (None, "", "0")


def _wait_for(folder: Path, key: dict, timeout: float = 6 * 3600) -> PairTable | None:
    """The table local rank 0 is building (None after `timeout`: build it here too)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (folder / "meta.json").exists():
            try:
                return load_table(folder, key)
            except SarkitError:
                pass  # being replaced: look again
        time.sleep(0.5)
    return None


def memory_table(records: Sequence[dict], codec: Any, source: str, strict: bool) -> PairTable:
    """A table of records already in memory (stdin, tests, SCIO), in a temporary folder."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="sarkit-table-"))
    try:
        items = ((r, f"{source}:{i}", None) for i, r in enumerate(records, start=1))
        build_table(root / "t", items, codec, {"memory": True})
        table = load_table(root / "t")
        # the mapped files stay readable after their folder is gone (POSIX unlink)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    s = table.meta["skips"]
    Skips.from_meta(s).report(source, len(table), strict)
    return table


class RecordFiles:
    """Records still on disk, streamed when asked: one JSON Lines file, or tar shards.

    What `sarkit pretrain` hands its hook, so a million records are never all dicts in
    memory; iterating it yields the records (a plugin that wants a list can make one).
    """

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise SarkitError("no records given")
        tars = [p.suffix.lower() == ".tar" for p in self.paths]
        if any(tars) and not all(tars):
            raise SarkitError("give either one JSON Lines file or tar shards, not both")
        if not any(tars) and len(self.paths) > 1:
            raise SarkitError(f"{len(self.paths)} record files: give one (or tar shards)")
        for p in self.paths:
            if not p.exists():
                raise SarkitError(f"{p}: no such file")
            if p.is_dir():
                raise SarkitError(f"{p}: is a folder, expected a JSON Lines file or .tar shards")
        self.shards = all(tars)
        self.kind = "shards" if self.shards else "jsonl"

    def items(self) -> Iterator[tuple[dict, str, tuple | None]]:
        from sarkit.train.shards import shard_items

        return shard_items(self.paths) if self.shards else jsonl_items(self.paths[0])

    def records(self) -> Iterator[dict]:
        return (rec for rec, _, _ in self.items() if rec is not None)

    __iter__ = records


class _LineErrors:
    """read_records' report for damaged lines: each named on stderr, kept to be counted."""

    def __init__(self) -> None:
        self.pending: list[str] = []

    def error(self, message: str) -> None:
        log.warn(message)
        self.pending.append(message)


def jsonl_items(path: Path) -> Iterator[tuple[dict | None, str, None]]:
    """(record, 'file:line (id)', None) of a JSON Lines file; a damaged line (not JSON, not
    UTF-8, no id or path) is (None, its error, None): counted, never the end of the run."""
    from sarkit.records import read_records

    errors = _LineErrors()
    for item in read_records([str(path)], errors, ("id", "path")):
        yield from ((None, message, None) for message in errors.pending)
        errors.pending.clear()
        where = f"{item.source}:{item.line}" + (f" ({item.id})" if item.id else "")
        yield item.record, where, None
    yield from ((None, message, None) for message in errors.pending)
