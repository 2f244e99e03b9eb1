"""The ViT a fine-tune starts from (``--init``), with its preprocessing and provenance.

``--init`` takes a sarkit run folder (``export/vision.json`` + ``export/vision.safetensors``,
as pretraining and SCIO write them), ``timm:NAME`` (timm's pretrained weights for NAME),
``random`` (``--vision`` with random weights) or a weights FILE for ``--vision``
(safetensors, or a torch file read with ``weights_only=True``). The provenance (what it was,
the weights' SHA-256, the source run's vision.json) goes into the fine-tune's config.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sarkit.errors import SarkitError, UsageError


@dataclass
class BackboneSpec:
    """How to rebuild the backbone (config.json's ``vision``) and where it came from."""

    timm_name: str
    image_size: int
    model_args: dict = field(default_factory=dict)
    mean: float = 0.5
    std: float = 0.5
    center_crop: float = 1.0
    stats_from_init: bool = False  # mean/std come with the init (else from the data)
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "timm_name": self.timm_name,
            "image_size": self.image_size,
            "model_args": self.model_args,
            "mean": self.mean,
            "std": self.std,
            "center_crop": self.center_crop,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BackboneSpec:
        return cls(
            timm_name=d["timm_name"],
            image_size=int(d["image_size"]),
            model_args=dict(d.get("model_args") or {}),
            mean=float(d.get("mean", 0.5)),
            std=float(d.get("std", 0.5)),
            center_crop=float(d.get("center_crop", 1.0)),
        )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_init(
    init: str, vision: str, image_size: int, model_args: dict | None = None
) -> tuple[BackboneSpec, str | None]:
    """(the backbone's spec, the weights to load: None, 'timm' or a file) for ``--init``.

    `model_args` (``--vision-args``) shape a random, timm or FILE backbone; a run folder's
    export fixes its own architecture, so they are refused there rather than ignored.
    """
    from sarkit.model.vision import vision_name

    args = dict(model_args or {})
    if init == "random":
        spec = BackboneSpec(vision_name(vision), image_size, args, provenance={"kind": "random"})
        return spec, None
    if init.startswith("timm:"):
        name = init.removeprefix("timm:")
        if not name:
            raise UsageError("--init timm:NAME needs a timm model name")
        spec = BackboneSpec(
            vision_name(name), image_size, args, provenance={"kind": "timm", "name": name}
        )
        return spec, "timm"
    path = Path(init)
    if path.is_dir():
        if args:
            raise UsageError(
                f"--init {init}: a run folder fixes its backbone's architecture; "
                "--vision-args applies to random, timm:NAME and FILE inits"
            )
        meta_path = path / "export" / "vision.json"
        weights = path / "export" / "vision.safetensors"
        if not meta_path.exists() or not weights.exists():
            raise SarkitError(
                f"--init {init}: a folder without export/vision.json and "
                "export/vision.safetensors (not a sarkit pretrain or scio run)"
            )
        try:
            meta = json.loads(meta_path.read_text())
            name = meta["timm_name"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SarkitError(f"{meta_path}: not a vision export description ({exc})") from None
        spec = BackboneSpec(
            name,
            image_size,
            model_args=dict(meta.get("model_args") or {}),
            mean=float((meta.get("mean") or [0.5])[0]),
            std=float((meta.get("std") or [0.5])[0]),
            center_crop=float(meta.get("center_crop", 1.0)),
            stats_from_init=True,
            provenance={
                "kind": "run",
                "run": str(path.resolve()),
                "weights": str(weights.resolve()),
                "sha256": sha256(weights),
                "vision_json": meta,
            },
        )
        return spec, str(weights)
    if path.is_file():
        spec = BackboneSpec(
            vision_name(vision),
            image_size,
            args,
            provenance={"kind": "file", "path": str(path.resolve()), "sha256": sha256(path)},
        )
        return spec, str(path)
    raise UsageError(f"--init {init}: not a run folder, a weights file, timm:NAME or 'random'")


def build_backbone(spec: BackboneSpec, weights: str | None, drop_path: float = 0.0) -> Any:
    """The headless 1-channel timm ViT of `spec`, with `weights` loaded."""
    from sarkit.model.vision import build_vision

    return build_vision(spec.timm_name, spec.image_size, weights, drop_path, spec.model_args)


def init_label(provenance: dict) -> str:
    """A short name for a run's init in tables: the run folder's name, timm:NAME, random."""
    kind = provenance.get("kind")
    if kind == "run":
        return Path(provenance.get("run", "run")).name
    if kind == "timm":
        return f"timm:{provenance.get('name')}"
    if kind == "file":
        return Path(provenance.get("path", "file")).name
    return "random"
