"""Every sarkit hook, in one place, grouped by phase.

A plugin is any module or object with functions named like these, marked with
``sarkit.hookimpl``. Built-in features are plugins too: they register through the same
manager, before third-party plugins, so a third-party implementation is called first and
can take over a stage by returning a result (or decline by returning ``None``).

Two kinds of hooks:

* *Registries* are collected: every plugin may contribute, results are concatenated, and
  a later name replaces an earlier one only where the registry's docstring says so.
* *Stages* are ``firstresult``: the first implementation that returns something other than
  ``None`` does the stage. The built-in implementation is last in line.

Options objects are plain dataclasses defined beside each stage (``sarkit.<stage>``); a
plugin reads the fields it needs and ignores the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pluggy

hookspec = pluggy.HookspecMarker("sarkit")

# --------------------------------------------------------------------------------------
# Types the registries return (protocols: any object with these attributes works).
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadOption:
    """One option a head or builder adds to its command line (``--head``, ``--palette``).

    ``flag`` is the long option; its value lands in ``options.extra[dest]`` (``dest``: the
    flag without dashes, ``-`` -> ``_``). ``type`` is str, int, float, bool (a switch) or a
    parser like ``sarkit.ranges.number_in(...)`` (checked at parse time, exit 2);
    ``choices`` limits a str; ``modes`` says which commands offer it: "finetune", "eval",
    "build".
    """

    flag: str
    help: str
    default: Any = None
    type: Any = str
    choices: tuple[str, ...] = ()
    modes: tuple[str, ...] = ("finetune",)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@runtime_checkable
class TaskHead(Protocol):
    """A downstream task: ``sarkit finetune NAME`` trains it, ``sarkit eval NAME`` measures it.

    ``defaults`` are the task's settings of the common options (the paper's Table 3:
    ``lr``, ``schedule``, ``warmup_steps``, ``epochs``, ``batch_size``, ``image_size``,
    ``weight_decay`` ...) where the user gives none; ``primary`` is the metric that picks
    the best epoch and leads ``eval --compare``. Options objects are
    ``sarkit.tasks.options.FinetuneOptions`` / ``EvalOptions`` (head options in ``extra``).
    """

    name: str
    summary: str
    primary: str
    defaults: Mapping[str, Any]
    options: Sequence[HeadOption]

    def prepare(self, options: Any) -> Any:
        """Read the data, fix the split, build the model: a ``sarkit.tasks.Prepared``
        (the loop's task, dataset and collate, the split, and the head's config for the run's
        config.json). The loop's task ``evaluate``s the held-out split every epoch."""

    def evaluate(self, run: Path, options: Any) -> Any:
        """Reload a fine-tuned run folder and measure it on ``options.data``: a
        ``sarkit.tasks.EvalResult`` (flat ``metrics``, per-item ``details`` for figures)."""

    def figures(self, result: Any, folder: Path) -> list[Path]:
        """Draw the result's figures (confusion matrix, PR curve, overlays) into `folder`."""


@runtime_checkable
class DataBuilder(Protocol):
    """Makes a fine-tuning dataset file from raw annotations (``sarkit finetune build``)."""

    name: str
    trigger: str  # the flag that selects this builder, e.g. "--boxes-from-masks"
    options: Sequence[HeadOption]  # modes=("build",); the trigger is one of them

    def build(self, options: Mapping[str, Any], output: Path) -> str:
        """Write `output` (atomically); return a one-line summary for stderr."""


@runtime_checkable
class IndexBackend(Protocol):
    """How `sarkit search` ranks an index's vectors (``sarkit embed --backend NAME``).

    Vectors are unit-length float32 rows, so inner product = cosine similarity. ``build``
    runs once at the end of `sarkit embed` over every vector and writes its own files into
    `folder` (numpy, safetensors or ``faiss.write_index``; never pickle); it returns
    JSON-able settings the index manifest keeps. ``open`` makes a searcher at query time:
    ``searcher.search(queries (q, d), k, allowed)`` returns (scores, indices), each (q, k),
    best first, -1 where fewer than k were found; ``allowed`` is None or an (n,) bool mask
    of the tiles the filters keep. ``searcher.exact`` says whether the ranking is exact.
    """

    name: str
    summary: str

    def build(self, vectors: Any, folder: Path) -> dict:
        """Build the structure over `vectors` into `folder`; its settings."""

    def open(self, vectors: Any, folder: Path, settings: dict) -> Any:
        """A searcher over `vectors` from what ``build`` wrote."""


# --------------------------------------------------------------------------------------
# Registries: what users swap by installing a plugin.
# --------------------------------------------------------------------------------------


@hookspec
def sarkit_sensors() -> list[Any]:
    """Contribute SAR sensor profiles (``sarkit.sensors.SensorProfile``).

    Called once when the sensor registry is first needed. Return a list of profiles: a name
    (``--sensor``), band, nominal pixel size, polarisations and how to recognise the
    platform's files from metadata or file names. Profiles from all plugins are collected;
    a later plugin's profile with the same name replaces the earlier one.
    """


@hookspec
def sarkit_quantisers() -> list[Any]:
    """Contribute quantisers (``sarkit.raster.quantise.Quantiser``): float SAR -> uint8.

    Called once when the quantiser registry is first needed. A quantiser fits its
    parameters on scene-level statistics, then maps every tile with the same parameters so
    neighbouring tiles agree. Collected from all plugins; same name replaces.
    """


@hookspec
def sarkit_quality_filters() -> list[Any]:
    """Contribute tile quality filters for ``sarkit filter``.

    Called once per ``filter`` run. Return ``sarkit.quality.rules.QualityFilter`` objects
    (picklable: they run in worker processes): ``measure(tile)`` adds features from the
    pixels, ``verdict(quality, options)`` says fail / pass / unsure; ``name`` is the drop
    reason and the ``--disable`` name. Collected from all plugins, built-ins first; the
    first failing filter gives a tile its reason; same name replaces.
    """


@hookspec
def sarkit_llm_backends() -> list[Any]:
    """Contribute LLM backends for ``sarkit caption``; each registers the model names it serves.

    Called once when ``--llm NAME`` is resolved. Return a list of backends
    (``sarkit.llm.base.Backend``): a ``name``, ``models`` (``sarkit.llm.base.Model``: the
    name ``--llm`` takes, prices per million tokens, whether it takes a JSON schema) and
    ``connect(model, options)`` returning a thread-safe client whose ``complete(request,
    repair=None)`` captions one tile. Collected from all plugins; the first backend that
    claims a model name serves it, so a third-party backend can take a name from a
    built-in one.
    """


@hookspec
def sarkit_task_heads() -> list[TaskHead]:
    """Contribute downstream task heads (classify, detect, segment, retrieve, caption, vqa).

    Called when ``sarkit finetune TASK`` or ``sarkit eval TASK`` resolves its task (and for
    their ``--help``). Return :class:`TaskHead` objects: each names its task, adds its own
    options, builds its data and the loop's task, and computes and draws its metrics.
    Collected from all plugins (``sarkit.tasks.registry``); a later plugin's head with the
    same name replaces the earlier one (a third-party ``classify`` replaces the built-in).
    """


@hookspec
def sarkit_data_builders() -> list[DataBuilder]:
    """Contribute dataset builders for ``sarkit finetune build`` (:class:`DataBuilder`).

    Called when ``finetune build`` parses its line. Each builder adds options; the one
    whose ``trigger`` option is given runs (exactly one per call). Built-in:
    ``--boxes-from-masks MASKDIR`` (COCO JSON from ship masks). Collected; same name
    replaces.
    """


@hookspec
def sarkit_index_backends() -> list[IndexBackend]:
    """Contribute vector index backends for ``sarkit embed`` / ``sarkit search``.

    Called when an index is built (end of ``embed``) or opened (``search``). Return
    :class:`IndexBackend` objects. Built-in: ``exact`` (a numpy scan), ``faiss-ivf``
    (FAISS IndexIVFFlat) and ``faiss-ivfpq`` (IVF over 4-bit PQ codes, candidates re-scored
    on the stored vectors), nprobe calibrated to recall@10 >= 0.95; ``embed --backend auto``
    takes ``faiss-ivfpq`` from ``sarkit.search.backends.AUTO_MIN`` vectors. Collected; a later
    plugin's backend with the same name replaces the earlier one.
    """


# --------------------------------------------------------------------------------------
# Stages: one per subcommand, in pipeline order. firstresult: the first non-None wins.
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def sarkit_slice(scene: Path, options: Any, report: Any) -> Iterator[dict] | None:
    """Cut one scene into resolution-consistent tiles and yield one record per tile.

    Called once per input scene by ``sarkit slice``. ``options`` is a
    ``sarkit.slice.SliceOptions``; ``report`` a ``sarkit.report.Report`` for counting skipped
    tiles. Raise ``SarkitError`` for a scene that cannot be read (the CLI reports it and goes
    on with the next scene). Return ``None`` to leave the scene to the next implementation
    (e.g. a plugin for one file format).
    """


@hookspec(firstresult=True)
def sarkit_georef(record: dict, options: Any) -> dict | None:
    """Add ``geo`` (centre, WGS84 footprint, nearest place) to one tile record.

    Called once per record by ``sarkit georef``. Return the record with ``geo`` added; raise
    ``SarkitError`` for a tile that has no georeferencing (it is reported and skipped).
    """


@hookspec(firstresult=True)
def sarkit_filter(records: Iterable[dict], options: Any, report: Any) -> Iterator[dict] | None:
    """Screen tile records for quality; yield every record with ``quality`` added.

    Called once per ``sarkit filter`` run with the whole record stream. The CLI drops
    records whose ``quality.keep`` is false unless ``--mark`` is given.
    """


@hookspec(firstresult=True)
def sarkit_caption(records: Iterable[dict], options: Any, report: Any) -> Iterator[dict] | None:
    """Caption tile records with an LLM backend; yield each record with ``texts`` and ``caption``.

    Called once per ``sarkit caption`` run with the whole record stream (parents must be
    captioned before children, so the stage sees all records).
    """


@hookspec(firstresult=True)
def sarkit_pretrain(records: list[dict], options: Any) -> Path | None:
    """Pretrain a vision-language model on captioned records; return the run folder.

    From `sarkit pretrain`, `records` is a ``sarkit.train.table.RecordFiles`` (a JSON Lines
    file or tar shards, streamed: a million records are never all in memory; iterating it
    yields the record dicts), or a list of records read from stdin.
    """


@hookspec(firstresult=True)
def sarkit_scio(records: list[dict], options: Any) -> Path | None:
    """Run self-consistent iterative optimisation; return the run folder (with refined records).

    Called once by `sarkit scio` with every input record (in order) and a
    ``sarkit.scio.options.ScioOptions`` (pretrain's options plus rounds, margins, field cap,
    ``screen_only``, ``ablation``). The folder must hold ``refined.jsonl`` (``screened.jsonl``
    with ``screen_only``): every input record, the ones it could not judge unchanged. The
    built-in (``sarkit.scio``) is registered ``trylast``; the first non-None result wins.
    """


@hookspec(firstresult=True)
def sarkit_finetune(task: str, options: Any) -> Path | None:
    """Fine-tune a backbone on task `task`; return the run folder.

    Called once per ``sarkit finetune TASK`` with a ``sarkit.tasks.options.FinetuneOptions``
    (the head's own options in ``options.extra``). The built-in implementation (last in
    line) runs the registered head through the shared loop (``sarkit.tasks.finetune.run``).
    """


@hookspec(firstresult=True)
def sarkit_eval(task: str, options: Any) -> dict | None:
    """Measure a fine-tuned run on task `task`; return its record (``metrics`` and more).

    Called once per ``sarkit eval TASK RUN`` with a ``sarkit.tasks.options.EvalOptions``;
    the built-in implementation reloads the run with its head (``head.evaluate``), draws the
    figures and writes ``eval/TASK.json``.
    """


@hookspec(firstresult=True)
def sarkit_embed(options: Any, report: Any) -> Path | None:
    """Embed tile records into a search index folder; return the folder.

    Called once per ``sarkit embed`` with a ``sarkit.search.embed.EmbedOptions`` (record
    files, ``output``, ``run``, batch size, reader threads, chunk size, backend name) and a
    ``sarkit.report.Report`` (unreadable tiles are errors, counted, and skipped). The
    built-in (``sarkit.search.embed``, ``trylast``) stores the run's normalised ITC vectors,
    the records and the model's identity, resumably.
    """


@hookspec(firstresult=True)
def sarkit_search(options: Any, report: Any) -> tuple[list[dict], Any] | None:
    """Rank an index for a text or a tile; return (hits, the ``sarkit.search.archive.Archive``).

    Called once per ``sarkit search`` with a ``sarkit.search.query.SearchOptions`` (query
    text or ``like`` tile, k, filters, ``rerank``). Hits are the stored records with
    ``score`` and ``rank`` (and ``itc``/``itm`` when re-ranked), best first; the CLI writes
    them, the GeoJSON and the contact sheet. The built-in (``sarkit.search.query``) is
    ``trylast``.
    """
