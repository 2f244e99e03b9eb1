"""`sarkit filter`: screen tile records for quality (GLCM + statistics features, rules, kNN)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import typer

from sarkit import plugins
from sarkit.errors import SarkitError
from sarkit.outputs import check_file
from sarkit.quality import FilterOptions
from sarkit.ranges import FRACTION, NON_NEGATIVE
from sarkit.report import Report
from sarkit.stage import run_record_stage, unique_ids, with_tile_paths


def command(
    inputs: list[str] = typer.Argument(None, help="Tile record files (JSON Lines); stdin if none."),
    output: str = typer.Option(None, "-o", "--output", help="Write records here (atomic)."),
    mark: bool = typer.Option(
        False, "--mark", help="Keep every record; rejected ones carry quality.keep=false."
    ),
    seed_labels: Path = typer.Option(
        None, "--seed-labels", help="CSV of hand labels 'id,label' (keep/drop) for the kNN."
    ),
    report_png: Path = typer.Option(
        None, "--report", help="Write a contact sheet PNG: kept vs dropped, per reason."
    ),
    max_nodata: float = typer.Option(
        0.5,
        parser=FRACTION,
        help="Drop a tile whose nodata (0) regions cover more than this fraction (0-1).",
    ),
    min_std: float = typer.Option(
        2.0, parser=NON_NEGATIVE, help="Drop a tile whose grey-level std is below this (DN)."
    ),
    max_saturated: float = typer.Option(
        0.2,
        parser=FRACTION,
        help="Drop a tile with more than this fraction of valid pixels at 255 (0-1).",
    ),
    min_structure: float = typer.Option(
        1.0,
        parser=NON_NEGATIVE,
        help="Region screening: drop a tile whose structure score (texture correlation, edges, "
        "bright scatterers; 1 = reference) is below this.",
    ),
    k: int = typer.Option(7, "--k", min=1, help="Neighbours in the kNN vote."),
    min_score: float = typer.Option(
        0.5, parser=FRACTION, help="kNN P(keep) a tile near a threshold needs (0-1)."
    ),
    margin: float = typer.Option(
        2.0,
        min=1.0,
        help="A tile this factor inside every threshold is a clear keep (a kNN seed); "
        "tiles between the threshold and the margin are decided by the kNN.",
    ),
    disable: list[str] = typer.Option(
        None,
        "--disable",
        help="Switch a filter off by name (repeatable): nodata, constant, saturated, "
        "structure-poor (region screening; off for marine datasets), knn, or a plugin's.",
    ),
    jobs: int = typer.Option(
        os.cpu_count() or 1, "-j", "--jobs", min=1, help="Worker processes for the features."
    ),
    remeasure: bool = typer.Option(
        False,
        "--remeasure",
        help="Measure every tile again, even records whose quality features (from an earlier "
        "--mark run) are reused by default.",
    ),
) -> None:
    """Screen tiles: drop nodata, flat, saturated and structure-poor tiles, kNN for the rest."""
    check_file(output, "--output")
    check_file(report_png, "--report")
    options = FilterOptions(
        max_nodata=max_nodata,
        min_std=min_std,
        max_saturated=max_saturated,
        min_structure=min_structure,
        k=k,
        min_score=min_score,
        margin=margin,
        disabled=frozenset(disable or ()),
        seed_labels=seed_labels,
        jobs=jobs,
        remeasure=remeasure,
    )
    report = Report("filter")  # done = kept; dropped per reason
    sheet = None
    if report_png is not None:
        from sarkit.quality.report import ContactSheet

        sheet = ContactSheet()

    def transform(items, rep):
        records = (item.record for item in with_tile_paths(unique_ids(items, rep), rep))
        out = plugins.get_manager().hook.sarkit_filter(records=records, options=options, report=rep)
        if out is None:
            raise SarkitError("no plugin implements the filter stage")
        dropped: Counter = Counter()
        for record in out:
            quality = record.get("quality") or {}
            if quality.get("keep", True):
                rep.ok()
            else:
                dropped[str(quality.get("reason"))] += 1
            if sheet is not None:
                sheet.add(record)
            if mark or quality.get("keep", True):
                yield record
        for reason, n in sorted(dropped.items()):
            if mark:  # written with keep=false: not skipped, but the count still matters
                rep.notes[f"marked drop: {reason}"] = n
            else:
                rep.skip(reason, n)
        if sheet is not None:
            try:  # a side output: its failure must not cost the records
                sheet.save(report_png)
                rep.notes["contact sheet"] = str(report_png)
            except (OSError, SarkitError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                rep.error(f"{report_png} (--report): contact sheet not written ({why})")

    code = run_record_stage(report, inputs, output, transform, required=("id", "path"))
    raise typer.Exit(code)
