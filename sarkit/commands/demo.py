"""`sarkit demo`: the whole landed pipeline on a synthesised scene; no download, key or GPU."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from sarkit import log
from sarkit.errors import SarkitError


def steps(out: Path) -> list[list[str]]:
    """The pipeline as a user would type it, one stage per step, files between stages."""
    scene = out / "scene" / "pudong_synthetic.tif"
    return [
        [
            "slice",
            str(scene),
            "-o",
            str(out / "tiles"),
            "--ground-size",
            "1000,500,250",
            "--records",
            str(out / "tiles.jsonl"),
        ],
        [
            "georef",
            str(out / "tiles.jsonl"),
            "-o",
            str(out / "geo.jsonl"),
            "--geojson",
            str(out / "footprints.geojson"),
        ],
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
    for argv in steps(out):
        log.info(f"\n$ sarkit {shlex.join(argv)}")
        code = run(argv)
        if code != 0:
            raise SarkitError(f"demo step 'sarkit {argv[0]}' failed with exit code {code}")
    made = sorted(p for p in out.rglob("*") if p.is_file())
    log.info(f"\nmade {len(made)} files under {out}/, among them:")
    for path in made:
        if path.suffix in (".jsonl", ".geojson", ".png", ".csv", ".json"):
            log.info(f"  {path}")
