"""`sarkit georef`: add WGS84 centre, footprint and nearest place to tile records."""

from __future__ import annotations

import contextlib

import typer

from sarkit import plugins
from sarkit.errors import SarkitError
from sarkit.outputs import check_file
from sarkit.report import Report
from sarkit.stage import run_record_stage, unique_ids, with_tile_paths


def command(
    inputs: list[str] = typer.Argument(None, help="Record files (JSON Lines); none or - : stdin."),
    output: str = typer.Option(None, "--output", "-o", help="Write records to FILE (atomic)."),
    geojson: str = typer.Option(None, help="Also write footprints as a GeoJSON FeatureCollection."),
    geocode: bool = typer.Option(True, help="Look up the nearest place (offline GeoNames)."),
) -> None:
    """Georeference tiles: centre and footprint in WGS84 (affine, rotated or GCPs) + place."""
    from sarkit.raster.georef import GeoJSONWriter, GeorefOptions

    check_file(output, "--output")
    check_file(geojson, "--geojson")
    options = GeorefOptions(geocode=geocode)
    hook = plugins.get_manager().hook
    report = Report("georef")

    with contextlib.ExitStack() as stack:
        features = stack.enter_context(GeoJSONWriter(geojson)) if geojson else None

        def transform(items, report):
            for item in with_tile_paths(unique_ids(items, report), report):
                try:
                    record = hook.sarkit_georef(record=item.record, options=options)
                except SarkitError as exc:
                    report.error(f"{item.source}:{item.line}: {exc}")
                    continue
                if record is None:
                    report.error(f"{item.source}:{item.line}: no georef plugin took {item.id}")
                    continue
                if features is not None:
                    features.add(record)
                report.ok()
                yield record

        code = run_record_stage(report, inputs, output, transform, required=("id", "path"))
    raise typer.Exit(code)
