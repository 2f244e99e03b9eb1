"""`sarkit slice`: scenes -> resolution-consistent uint8 GeoTIFF tiles + one record per tile."""

from __future__ import annotations

import math
import os
from pathlib import Path

import typer

from sarkit import log, plugins
from sarkit.errors import SarkitError, UsageError
from sarkit.outputs import check_file, check_folder
from sarkit.ranges import FRACTION, POSITIVE, number_in
from sarkit.records import RecordWriter
from sarkit.report import Report


def parse_sizes(text: str) -> list[float]:
    try:
        sizes = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--ground-size must be metres, e.g. 4000,1000,250: {text}") from None
    if not sizes or any(not math.isfinite(s) or s <= 0 for s in sizes):
        raise UsageError(
            f"--ground-size must be positive finite metres, e.g. 4000,1000,250: {text}"
        )
    return sizes


def command(
    scenes: list[Path] = typer.Argument(..., help="Scene files (anything GDAL opens)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the tiles."),
    ground_size: str = typer.Option(
        "1000",
        "--ground-size",
        "-g",
        help="Tile ground size in metres, or a list large to small (L,M,S), e.g. 4000,1000,250.",
    ),
    band: str = typer.Option("1", help="Band to tile: 1-based index or polarisation (VV, VH...)."),
    sensor: str = typer.Option("auto", help="Sensor profile name; auto detects it."),
    quantiser: str = typer.Option(
        "auto", help="Quantiser name; auto: 'none' for uint8 scenes, else 'log-percentile'."
    ),
    radiometry: str = typer.Option(
        "auto", help="Pixel values are amplitude, power or db; auto asks the sensor profile."
    ),
    nodata: str = typer.Option(
        "auto", help="Nodata value; auto: the tag, else 0 (zero-filled borders); none: NaN only."
    ),
    edge: str = typer.Option("drop", help="Partial tiles at the scene edge: drop or keep."),
    min_coverage: float = typer.Option(
        0.5,
        parser=number_in(0, 1, lo_open=True),
        help="With --edge keep: least fraction of a tile inside the scene (0 < x <= 1).",
    ),
    max_nodata: float = typer.Option(
        0.5, parser=FRACTION, help="Skip tiles with more nodata than this fraction (0-1)."
    ),
    workers: int = typer.Option(
        min(4, os.cpu_count() or 1),
        "--workers",
        "-j",
        min=1,
        help="Worker processes reading, quantising and writing tiles.",
    ),
    compress: str = typer.Option(
        "zstd",
        help="Tile compression: zstd (GDAL >= 2.3 reads it; 2.6x faster than deflate on "
        "speckle at the same size), deflate (for older readers), lzw, none.",
    ),
    pixel_size: float = typer.Option(
        None, parser=POSITIVE, help="Pixel size in metres for scenes without georeferencing."
    ),
    overwrite: bool = typer.Option(False, help="Rewrite tiles that already exist."),
    records: str = typer.Option(None, "--records", help="Write records to FILE, not stdout."),
) -> None:
    """Cut scenes into tiles that cover the same ground whatever the pixel size (SRC)."""
    from sarkit.raster.quantise import to_amplitude  # noqa: F401  (fail early if numpy broken)
    from sarkit.raster.slicer import SliceOptions

    if edge not in ("drop", "keep"):
        raise UsageError("--edge must be drop or keep")
    if radiometry not in ("auto", "amplitude", "power", "db"):
        raise UsageError("--radiometry must be auto, amplitude, power or db")
    options = SliceOptions(
        out_dir=out_dir,
        ground_sizes=parse_sizes(ground_size),
        band=band,
        sensor=sensor,
        quantiser=quantiser,
        radiometry=radiometry,
        nodata=nodata,
        keep_partial=edge == "keep",
        min_coverage=min_coverage,
        max_nodata=max_nodata,
        workers=workers,
        compress=compress,
        overwrite=overwrite,
        pixel_size=pixel_size,
    )
    if sensor != "auto":
        from sarkit import sensors

        sensors.get(sensor)  # an unknown name is a usage error listing the known ones
    check_folder(out_dir, "--out")
    check_file(records, "--records")
    report = Report("slice")
    try:
        _slice_all(scenes, options, report, records)
    except KeyboardInterrupt:
        log.error(
            f"interrupted after {report.done} new tiles; tiles already written are kept and "
            "reused: rerun the same command to resume"
        )
        raise typer.Exit(130) from None
    report.notes["scenes"] = len(scenes)
    report.print_summary()
    raise typer.Exit(1 if report.failed else 0)


def _slice_all(scenes: list[Path], options, report: Report, records: str | None) -> None:
    hook = plugins.get_manager().hook
    with RecordWriter(records) as writer:
        for scene in scenes:
            try:
                tiles = hook.sarkit_slice(scene=scene, options=options, report=report)
                if tiles is None:
                    raise SarkitError(f"{scene}: no slice plugin accepted this scene")
                for record in tiles:
                    writer.write(record)
            except UsageError:
                raise
            except SarkitError as exc:
                report.error(str(exc))
                report.skip("scene not sliced")
