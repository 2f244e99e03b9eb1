"""`sarkit search`: the tiles of an index that best match a sentence (or a tile), as records."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from sarkit import log, plugins
from sarkit.errors import SarkitError
from sarkit.outputs import check_file
from sarkit.records import RecordWriter
from sarkit.report import Report

SHEET_MAX = 48  # hits drawn by --contact-sheet


def command(
    index: Path = typer.Argument(..., help="An index folder made by `sarkit embed`."),
    text: str = typer.Argument(None, help="The query, e.g. 'ships at anchor near a port'."),
    k: int = typer.Option(50, "-k", "--top", min=1, help="Hits to return."),
    like: str = typer.Option(
        None, "--like", help="Rank by similarity to this tile (an id of the index or a file)."
    ),
    run: Path = typer.Option(
        None, "--run", help="The index's model if its run folder moved (checked by hash)."
    ),
    bbox: str = typer.Option(
        None, "--bbox", help="WEST,SOUTH,EAST,NORTH (WGS84): tiles whose footprint meets it."
    ),
    sensor: list[str] = typer.Option(None, "--sensor", help="Only these sensors (repeatable)."),
    scale: list[str] = typer.Option(None, "--scale", help="Only these scales (repeatable)."),
    rerank: int = typer.Option(
        0, "--rerank", min=0, help="Re-score the N best by ITM (reads those tiles again)."
    ),
    exact: bool = typer.Option(False, "--exact", help="Scan every vector even with an IVF."),
    output: str = typer.Option(None, "--output", "-o", help="Write the hits here (atomic)."),
    geojson: str = typer.Option(
        None, "--geojson", help="Also write the hits' footprints (score, rank, path) as GeoJSON."
    ),
    contact_sheet: str = typer.Option(
        None, "--contact-sheet", help=f"Also draw the best {SHEET_MAX} hits into a PNG."
    ),
) -> None:
    """Find tiles by a sentence or a tile: records with score and rank, best first."""
    from sarkit.search.geo import parse_bbox
    from sarkit.search.query import SearchOptions

    box = parse_bbox(bbox) if bbox is not None else None
    for path, option in ((output, "--output"), (geojson, "--geojson")):
        check_file(path, option)
    check_file(contact_sheet, "--contact-sheet")
    options = SearchOptions(
        index=index,
        text=text,
        like=like,
        k=k,
        run=run,
        bbox=box,
        sensors=list(sensor or []),
        scales=list(scale or []),
        rerank=rerank,
        exact=exact,
    )
    report = Report("search")
    with contextlib.redirect_stdout(sys.stderr):
        result = plugins.get_manager().hook.sarkit_search(options=options, report=report)
    if result is None:
        raise SarkitError("no search plugin took the query")
    hits, archive = result
    write_outputs(hits, archive, output, geojson, contact_sheet, text or f"like {like}", report)
    report.ok(len(hits))
    report.print_summary()
    raise typer.Exit(1 if report.failed else 0)


def write_outputs(hits, archive, output, geojson, sheet, query: str, report: Report) -> None:
    """Records (stdout or --output), footprints (--geojson), thumbnails (--contact-sheet):
    the files are written only when everything is ready, each atomically."""
    from sarkit.raster.georef import GeoJSONWriter

    if geojson:
        with GeoJSONWriter(geojson) as features:
            missing = 0
            for hit in hits:
                geo = hit.get("geo")
                if not isinstance(geo, dict) or not geo.get("footprint"):
                    missing += 1
                    continue
                features.add(hit, {"score": hit["score"], "rank": hit["rank"]})
        if missing:
            report.notes["hits without geo (not in GeoJSON)"] = missing
    if sheet:
        from sarkit.quality.report import ContactSheet

        columns = archive.columns()
        where = {str(i): str(p) for i, p in zip(columns["ids"], columns["paths"], strict=True)}
        drawn = min(len(hits), SHEET_MAX)
        cs = ContactSheet(per_group=drawn, title="sarkit search")
        group = f"top {drawn} of {len(hits)}: {query}"
        for hit in hits[:drawn]:
            cs.add(hit, group=group, score=float(hit["score"]), path=where.get(str(hit["id"])))
        cs.save(sheet)
        log.debug(f"contact sheet -> {sheet}")
    with RecordWriter(output) as writer:
        writer.write_all(hits)
