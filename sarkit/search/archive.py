"""The index folder `sarkit embed` writes and `sarkit search` reads.

```
archive.index/
  index.json               the manifest: format, the model's identity, the chunks, the backend
  chunks/00000/            one folder per flushed batch of tiles, renamed into place complete
    vectors.npy            (n, d) float32, unit length: cosine similarity is a dot product
    columns.npz            ids, sensor, scale, resolved tile paths, WGS84 footprint rings,
                           byte offsets of the records (numpy arrays, no pickle)
    records.jsonl          the records as embedded (search prints them with score and rank)
  backend/<name>/          what a library backend built (FAISS IVF: centroids, assignments)
```

Chunks are only ever added. A chunk folder is written under a hidden name and renamed when
complete, then the manifest (written atomically) lists it. A kill -9 between the two leaves a
complete chunk the manifest does not list yet: the next run adopts it instead of embedding
those tiles again; a hidden half-written folder is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sarkit.atomic import write_text
from sarkit.errors import SarkitError

FORMAT = "sarkit-index/1"
MANIFEST = "index.json"
RING = 5  # georef's footprint: a closed ring of 4 corners


def footprint_ring(record: dict) -> np.ndarray:
    """The record's WGS84 footprint as a (5, 2) ring; NaN without ``geo``. A ring of another
    length is replaced by its bounding box (a superset: a filter may keep a tile it should
    not, never lose one)."""
    geo = record.get("geo")
    ring = geo.get("footprint") if isinstance(geo, dict) else None
    out = np.full((RING, 2), np.nan)
    try:
        pts = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        return out
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3 or not np.isfinite(pts).all():
        return out
    if len(pts) == RING:
        return pts
    (w, s), (e, n) = pts.min(0), pts.max(0)
    return np.array([[w, s], [e, s], [e, n], [w, n], [w, s]])


@dataclass
class Chunk:
    """One chunk's columns (vectors are read on demand)."""

    name: str
    folder: Path
    count: int


class Archive:
    """An index folder: its manifest, chunks and backend files."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest

    # -- opening ---------------------------------------------------------------------

    @staticmethod
    def read_manifest(folder: Path) -> dict:
        folder = Path(folder)
        path = folder / MANIFEST
        if not folder.exists():
            raise SarkitError(f"{folder}: no such index (make one with `sarkit embed`)")
        if not folder.is_dir():
            raise SarkitError(f"{folder}: not an index folder (a file; `sarkit embed` makes one)")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SarkitError(f"{folder}: not a sarkit index (no {MANIFEST})") from None
        except (OSError, ValueError) as exc:
            raise SarkitError(f"{path}: damaged index manifest ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise SarkitError(f"{path}: not a {FORMAT} manifest (format {got!r})")
        for key in ("model", "dim", "chunks"):
            if key not in manifest:
                raise SarkitError(f"{path}: damaged index manifest (no '{key}')")
        return manifest

    @classmethod
    def open(cls, folder: str | os.PathLike) -> Archive:
        """An existing index, read-only use (search)."""
        folder = Path(folder)
        return cls(folder, cls.read_manifest(folder))

    @classmethod
    def create_or_resume(cls, folder: str | os.PathLike, model: dict, dim: int) -> Archive:
        """The index to append to: new, or an existing one embedded with the same model
        (complete chunks the manifest missed are adopted, half-written ones removed)."""
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            archive = cls.open(folder)
            archive.check_model(model, f"{folder} was embedded with another model")
            archive._adopt_orphans()
            return archive
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise SarkitError(f"{folder}: exists and is not a sarkit index; choose another -o")
        manifest = {"format": FORMAT, "dim": int(dim), "model": model, "chunks": [], "count": 0}
        (folder / "chunks").mkdir(parents=True, exist_ok=True)
        archive = cls(folder, manifest)
        archive._write_manifest()
        return archive

    def check_model(self, model: dict, what: str) -> None:
        """Refuse a model whose identity (weights hash, normalisation) is not the index's."""
        mine = self.manifest["model"]
        for key in ("sha256", "normalisation", "dim"):
            if mine.get(key) != model.get(key):
                raise SarkitError(
                    f"{what}: {key} {str(model.get(key))[:16]} is not the index's "
                    f"{str(mine.get(key))[:16]} (index model: {mine.get('run')}); "
                    "embed the archive again with this model"
                )

    def _write_manifest(self) -> None:
        write_text(self.folder / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")

    def _adopt_orphans(self) -> None:
        chunks_dir = self.folder / "chunks"
        chunks_dir.mkdir(exist_ok=True)
        for p in chunks_dir.iterdir():
            if p.name.startswith("."):  # a chunk the kill caught half-written
                shutil.rmtree(p, ignore_errors=True)
        adopted = False
        while True:
            name = f"{len(self.manifest['chunks']):05d}"
            folder = chunks_dir / name
            if not folder.is_dir():
                break
            try:
                count = len(np.load(folder / "vectors.npy", mmap_mode="r"))
            except (OSError, ValueError):
                shutil.rmtree(folder, ignore_errors=True)
                break
            self.manifest["chunks"].append({"name": name, "count": count})
            self.manifest["count"] = int(self.manifest.get("count", 0)) + count
            adopted = True
        if adopted:
            self.manifest.pop("backend", None)  # built over fewer vectors
            self._write_manifest()

    # -- writing ---------------------------------------------------------------------

    def append(self, vectors: np.ndarray, records: Sequence[dict], paths: Sequence[str]) -> None:
        """Add one complete chunk, then list it in the manifest (both atomic)."""
        if not len(records):
            return
        name = f"{len(self.manifest['chunks']):05d}"
        final = self.folder / "chunks" / name
        tmp = self.folder / "chunks" / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lines = [
            (json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
            for r in records
        ]
        offsets = np.cumsum([0] + [len(b) for b in lines]).astype(np.int64)
        (tmp / "records.jsonl").write_bytes(b"".join(lines))
        np.savez(
            tmp / "columns.npz",
            ids=np.array([str(r["id"]) for r in records]),
            sensor=np.array([str(r.get("sensor") or "") for r in records]),
            scale=np.array([str(r.get("scale") or "") for r in records]),
            paths=np.array([str(p) for p in paths]),
            rings=np.stack([footprint_ring(r) for r in records]),
            offsets=offsets,
        )
        np.save(tmp / "vectors.npy", np.ascontiguousarray(vectors, dtype=np.float32))
        shutil.rmtree(final, ignore_errors=True)  # never listed: the manifest is the truth
        os.replace(tmp, final)
        self.manifest["chunks"].append({"name": name, "count": len(records)})
        self.manifest["count"] = int(self.manifest.get("count", 0)) + len(records)
        self.manifest.pop("backend", None)
        self._write_manifest()

    def set_backend(self, name: str, settings: dict) -> None:
        self.manifest["backend"] = {"name": name, "count": self.count, "settings": settings}
        self._write_manifest()

    def backend_folder(self, name: str) -> Path:
        return self.folder / "backend" / name

    # -- reading ---------------------------------------------------------------------

    @property
    def count(self) -> int:
        return int(sum(c["count"] for c in self.manifest["chunks"]))

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def chunks(self) -> list[Chunk]:
        return [
            Chunk(c["name"], self.folder / "chunks" / c["name"], int(c["count"]))
            for c in self.manifest["chunks"]
        ]

    def _load(self, chunk: Chunk, what: str) -> Any:
        path = chunk.folder / what
        try:
            if what.endswith(".npz"):
                with np.load(path, allow_pickle=False) as z:
                    data = {k: z[k] for k in z.files}
                n = len(data["ids"])
            else:
                data = np.load(path, allow_pickle=False)
                n = len(data)
        except FileNotFoundError:
            raise SarkitError(f"{path}: missing (the index is damaged; embed again)") from None
        except (OSError, ValueError, KeyError) as exc:
            raise SarkitError(f"{path}: damaged ({exc}); embed again") from None
        if n != chunk.count:
            raise SarkitError(f"{path}: {n} rows, the manifest says {chunk.count}; embed again")
        return data

    def vectors(self) -> np.ndarray:
        """Every vector, in index order, as one (n, d) float32 array."""
        parts = [self._load(c, "vectors.npy") for c in self.chunks()]
        if not parts:
            return np.zeros((0, self.dim), np.float32)
        out = np.concatenate(parts).astype(np.float32, copy=False)
        if out.ndim != 2 or out.shape[1] != self.dim:
            raise SarkitError(f"{self.folder}: vectors of shape {out.shape}, not (n, {self.dim})")
        return out

    def columns(self) -> dict[str, np.ndarray]:
        """ids, sensor, scale, paths, rings (n, 5, 2) and (chunk, offset) of every record."""
        cols: dict[str, list] = {}
        for i, c in enumerate(self.chunks()):
            data = self._load(c, "columns.npz")
            data["chunk"] = np.full(c.count, i, dtype=np.int32)
            data["offsets"] = data["offsets"][:-1]
            for k, v in data.items():
                cols.setdefault(k, []).append(v)
        if not cols:
            return {
                "ids": np.array([], dtype=str),
                "sensor": np.array([], dtype=str),
                "scale": np.array([], dtype=str),
                "paths": np.array([], dtype=str),
                "rings": np.zeros((0, RING, 2)),
                "chunk": np.zeros(0, np.int32),
                "offsets": np.zeros(0, np.int64),
            }
        return {k: np.concatenate(v) for k, v in cols.items()}

    def ids(self) -> set[str]:
        out: set[str] = set()
        for c in self.chunks():
            out.update(self._load(c, "columns.npz")["ids"].tolist())
        return out

    def records(self, columns: dict[str, np.ndarray], indices: Sequence[int]) -> list[dict]:
        """The stored records at global `indices` (read by offset, not the whole file)."""
        chunks = self.chunks()
        out = []
        handles: dict[int, Any] = {}
        try:
            for g in indices:
                ci, off = int(columns["chunk"][g]), int(columns["offsets"][g])
                fh = handles.get(ci)
                if fh is None:
                    fh = handles[ci] = open(chunks[ci].folder / "records.jsonl", "rb")  # noqa: SIM115
                fh.seek(off)
                line = fh.readline()
                try:
                    out.append(json.loads(line))
                except ValueError:
                    raise SarkitError(
                        f"{chunks[ci].folder / 'records.jsonl'}: damaged record at byte {off}; "
                        "embed again"
                    ) from None
        except FileNotFoundError as exc:
            raise SarkitError(f"{exc.filename}: missing (the index is damaged)") from None
        finally:
            for fh in handles.values():
                fh.close()
        return out
