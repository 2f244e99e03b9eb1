"""`sarkit caption`: HCoT captions for tile records, through a swappable LLM backend."""

from __future__ import annotations

from pathlib import Path

import typer

from sarkit import log, plugins
from sarkit.caption import CaptionOptions
from sarkit.errors import UsageError
from sarkit.outputs import check_file
from sarkit.ranges import NON_NEGATIVE, POSITIVE
from sarkit.report import Report
from sarkit.stage import run_record_stage, unique_ids, with_tile_paths


def command(
    inputs: list[str] = typer.Argument(None, help="Record files (JSON Lines); none or - = stdin."),
    llm: str = typer.Option("offline", "--llm", help="Model name (see --list-models)."),
    task: str = typer.Option("auto", "--task", help="terrain, ground, marine or auto (per tile)."),
    output: str = typer.Option(None, "--output", "-o", help="Write records here (atomic)."),
    journal: str = typer.Option(None, "--journal", help="Append-only journal: reruns resume."),
    concurrency: int = typer.Option(8, "--concurrency", "-j", min=1, help="Requests in flight."),
    max_cost: float = typer.Option(
        None, "--max-cost", parser=NON_NEGATIVE, help="Stop before spending more (USD)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show prompts, estimate cost, send nothing."
    ),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N records."),
    base_url: str = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint (…/v1)."),
    model_id: str = typer.Option(None, "--model-id", help="Model id sent to the server."),
    keys_file: str = typer.Option(None, "--keys-file", help='JSON {"openai": KEY}.'),
    prompts: str = typer.Option(None, "--prompts", help="HCoT prompts folder (or SARKIT_PROMPTS)."),
    timeout: float = typer.Option(120.0, "--timeout", parser=POSITIVE, help="Seconds per request."),
    retries: int = typer.Option(
        6, "--retries", min=0, help="Retries per request on transient errors."
    ),
    image_size: int = typer.Option(
        1024, "--image-size", min=32, max=8192, help="Longest side sent to the model (px)."
    ),
    list_models: bool = typer.Option(False, "--list-models", help="List model names and exit."),
) -> None:
    """Caption tiles with hierarchical chain-of-thought prompts (parents before children)."""
    if list_models:
        from sarkit.llm.registry import models

        for name, (backend, model) in sorted(models().items()):
            print(f"{name}\t{backend.name}\t{model.description}")
        raise typer.Exit(0)
    if task not in ("auto", "terrain", "ground", "marine"):
        raise UsageError(f"--task must be terrain, ground, marine or auto, not '{task}'")
    check_file(output, "--output")
    check_file(journal, "--journal", append=True)
    options = CaptionOptions(
        llm=llm,
        task=task,
        prompts=prompts,
        base_url=base_url,
        model_id=model_id,
        keys_file=keys_file,
        concurrency=concurrency,
        journal=journal,
        max_cost=max_cost,
        dry_run=dry_run,
        limit=limit,
        timeout=timeout,
        retries=retries,
        image_size=image_size,
    )
    report = Report("caption")
    hook = plugins.get_manager().hook

    # relative tile paths are tried against the current folder, then beside each input file
    options.record_dirs = [str(Path(p).parent) for p in inputs or [] if p != "-"]

    def transform(items, report):
        records = (item.record for item in with_tile_paths(unique_ids(items, report), report))
        return hook.sarkit_caption(records=records, options=options, report=report) or []

    try:
        code = run_record_stage(report, inputs, output, transform, required=("id",))
    except KeyboardInterrupt:
        options.stop_event.set()
        where = (
            f"finished tiles are kept in {journal}; rerun the same command to resume"
            if journal
            else "nothing was kept: add --journal FILE to make a run resumable"
        )
        log.error(f"interrupted after {report.done} captioned tiles; {where}")
        raise typer.Exit(130) from None
    raise typer.Exit(code)
