"""`sarkit demo`: the whole landed pipeline on a synthesised scene; no download, key or GPU."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer

from sarkit import log
from sarkit.errors import SarkitError


def steps(out: Path) -> list[str]:
    """The pipeline as a user would type it, one stage per line, files between stages; a
    second demo into the same folder continues its pretraining run rather than refusing."""
    resume = " --resume latest" if (out / "runs" / "pretrain").is_dir() else ""
    out = shlex.quote(str(out))  # type: ignore[assignment]
    scene = f"{out}/scene/pudong_synthetic.tif"
    return [
        f"slice {scene} -o {out}/tiles --ground-size 1000,500,250 --records {out}/tiles.jsonl",
        f"georef {out}/tiles.jsonl -o {out}/geo.jsonl --geojson {out}/footprints.geojson",
        f"filter {out}/geo.jsonl -o {out}/kept.jsonl --report {out}/filter-report.png",
        f"caption {out}/kept.jsonl -o {out}/captioned.jsonl --llm offline"
        f" --journal {out}/caption.journal",
        f"pretrain {out}/captioned.jsonl -o {out}/runs/pretrain --vision vit_tiny_patch16_224"
        " --image-size 64 --text-layers 2 --max-tokens 96 --embed-dim 128 --queue-size 256"
        " --batch-size 8 --epochs 3 --max-steps 20 --warmup-steps 5 --momentum 0.9"
        f" --workers 0 --save-every 10{resume}",
    ]


def command(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for everything made."),
    size: int = typer.Option(2048, help="Side of the synthesised scene in pixels (1 m each)."),
) -> None:
    """Synthesise a georeferenced SAR scene and run every landed stage over it."""
    from sarkit.cli import run
    from sarkit.raster.synth import make_scene

    scene = out / "scene" / "pudong_synthetic.tif"
    if not scene.exists():
        log.info(f"synthesising a {size}x{size} SAR scene at Shanghai Pudong -> {scene}")
        make_scene(scene, size=size)
    for line in steps(out):
        argv = shlex.split(line)
        log.info(f"\n$ sarkit {shlex.join(argv)}")
        code = run(argv)
        if code != 0:
            raise SarkitError(f"demo step 'sarkit {argv[0]}' failed with exit code {code}")
    captioned = out / "captioned.jsonl"
    if captioned.exists():
        first = json.loads(captioned.read_text().splitlines()[0])
        log.info(f"\na caption ({first['id']}, {first.get('task', '')} task):")
        for field, text in first.get("texts", {}).items():
            log.info(f"  {field}: {text}")
    made = sorted(p for p in out.rglob("*") if p.is_file())
    log.info(f"\nmade {len(made)} files under {out}/, among them:")
    for path in made:
        if path.suffix in (".jsonl", ".geojson", ".png", ".csv", ".json"):
            log.info(f"  {path}")
