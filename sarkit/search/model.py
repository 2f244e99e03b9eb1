"""The run an index is embedded with: its identity, its towers, its tile preprocessing.

A run is a pretrain or SCIO run folder (``model.json`` + ``model.safetensors``) or a
fine-tuned retrieval run (``config.json`` + ``last.safetensors``); both load through
``sarkit.tasks.vl.data.FeatureModel``. Its identity (the SHA-256 of its config and weights,
the normalisation of the stored vectors, their dimension) is written into the index, and a
search with any other model is refused: vectors of two models share no space.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sarkit.errors import SarkitError
from sarkit.train.data import TileDataset

NORMALISATION = "l2: unit ITC vectors, cosine similarity = dot product"


def run_files(run: Path) -> tuple[Path, Path]:
    """(config file, weights file) of a run folder, or a one-line error naming it."""
    run = Path(run)
    if not run.is_dir():
        raise SarkitError(f"--run {run}: no such run folder")
    if (run / "model.json").exists():
        files = run / "model.json", run / "model.safetensors"
    elif (run / "config.json").exists():
        files = run / "config.json", run / "last.safetensors"
    else:
        raise SarkitError(f"--run {run}: not a sarkit run folder (no model.json or config.json)")
    if not files[1].exists():
        raise SarkitError(f"--run {run}: {files[1].name} missing (the run has not finished)")
    return files


def run_sha256(run: Path) -> str:
    """One hash of the run's config and weights: the model's identity."""
    h = hashlib.sha256()
    for path in run_files(run):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class EvalTiles(TileDataset):
    """The training tile reader without its replacement of bad tiles: an unreadable tile
    raises (embed skips and counts it) instead of standing in for the next one."""

    def readable(self, index: int) -> tuple[np.ndarray, int]:
        return self.read(index), index


class SearchModel:
    """A run's towers for search: image and text ITC vectors, ITM logits."""

    def __init__(self, run: Path):
        from sarkit.tasks.vl.data import FeatureModel

        run_files(run)
        self.run = Path(run)
        self.features = FeatureModel.load(self.run)
        self.lip = self.features.lip
        self.lip.eval()
        self.sha256 = run_sha256(self.run)

    @property
    def dim(self) -> int:
        return int(self.lip.config.embed_dim)

    def identity(self) -> dict[str, Any]:
        """What the index stores about the model; ``check_model`` compares the first three."""
        c = self.lip.config
        return {
            "sha256": self.sha256,
            "normalisation": NORMALISATION,
            "dim": self.dim,
            "run": str(self.run.resolve()),
            "vision": c.vision,
            "image_size": c.image_size,
            "image_mean": c.image_mean,
            "image_std": c.image_std,
            "center_crop": c.center_crop,
            "pool": c.pool,
        }

    def tiles(self, rows: list[dict], base: Path | None) -> EvalTiles:
        c = self.lip.config
        return EvalTiles(
            rows, c.image_size, base, None, 0, c.image_mean, c.image_std, c.center_crop
        )

    @torch.no_grad()
    def image_vectors(self, images: torch.Tensor) -> np.ndarray:
        return self.lip.encode_images(images)[1].float().numpy()

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.lip.image_tokens(images)

    def encode_text(self, text: str) -> Any:
        return self.features.codec.encode([[text]])

    @torch.no_grad()
    def text_vector(self, text: str) -> np.ndarray:
        enc = self.encode_text(text)
        return self.lip.encode_texts(enc)[0].float().numpy()
