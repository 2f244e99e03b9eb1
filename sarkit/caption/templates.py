"""HCoT prompt templates: find the prompts folder, read the task fields, fill the templates."""

from __future__ import annotations

import hashlib
import os
import string
from dataclasses import dataclass
from pathlib import Path

from sarkit.errors import SarkitError

PROMPTS_ENV = "SARKIT_PROMPTS"
FIELDS_PER_TASK = 8
TASKS = ("terrain", "marine", "ground")
SCALE_NAMES = {"L": "large", "M": "medium", "S": "small"}
WAVELENGTHS = {
    "Ka": "0.8 cm",
    "Ku": "2 cm",
    "X": "3 cm",
    "C": "5.6 cm",
    "S": "9 cm",
    "L": "24 cm",
    "P": "70 cm",
}


def find_prompts(explicit: str | os.PathLike | None = None) -> Path:
    """--prompts DIR, else $SARKIT_PROMPTS, else the repository's prompts/ beside the package."""
    candidates = []
    if explicit:
        candidates.append(("--prompts", Path(explicit)))
    elif os.environ.get(PROMPTS_ENV):
        candidates.append((PROMPTS_ENV, Path(os.environ[PROMPTS_ENV])))
    else:
        here = Path(__file__).resolve()
        candidates.append(("the sarkit checkout", here.parents[2] / "prompts"))
        candidates.append(("the installed package", here.parents[1] / "prompts"))
    for _, path in candidates:
        if (path / "system.txt").is_file():
            return path
    where, path = candidates[0]
    raise SarkitError(
        f"{path}: no HCoT prompts folder (system.txt missing; from {where}); "
        f"give --prompts DIR or set {PROMPTS_ENV}"
    )


@dataclass(frozen=True)
class Field:
    name: str
    prefix: str
    guide: str


@dataclass(frozen=True)
class TaskSpec:
    name: str
    fields: tuple[Field, ...]
    instructions: str  #: a template
    source: str

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SarkitError(f"{path}: cannot read prompt template ({exc.strerror})") from None


def parse_task(path: Path) -> TaskSpec:
    """`Name: prefix | guide` lines, then `---`, then the instruction template."""
    text = _read(path)
    head, sep, body = text.partition("\n---\n")
    if not sep:
        raise SarkitError(f"{path}: expected the 8 field lines, a line '---', then instructions")
    fields = []
    for n, line in enumerate(head.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, rest = line.partition(":")
        prefix, bar, guide = rest.partition("|")
        if not colon or not bar or not name.strip().isidentifier():
            raise SarkitError(f"{path}:{n}: expected 'Name: prefix | what to describe'")
        fields.append(Field(name.strip(), prefix.strip(), guide.strip()))
    if len(fields) != FIELDS_PER_TASK or len({f.name for f in fields}) != FIELDS_PER_TASK:
        raise SarkitError(
            f"{path}: a task defines {FIELDS_PER_TASK} distinct fields, found {len(fields)}"
        )
    return TaskSpec(path.stem, tuple(fields), body.strip(), str(path))


@dataclass
class Prompt:
    system: str
    user: str

    @property
    def sha256(self) -> str:
        data = ("system\0" + self.system + "\0user\0" + self.user).encode("utf-8")
        return hashlib.sha256(data).hexdigest()


class Templates:
    """The prompts folder, read once per run."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.system = _read(folder / "system.txt")
        self.tile = _read(folder / "tile.txt")
        layer_files = sorted((folder / "layers").glob("*.txt"))
        if len(layer_files) != 5:
            raise SarkitError(
                f"{folder / 'layers'}: expected the 5 HCoT layer files, found {len(layer_files)}"
            )
        self.layers = [(p, _read(p)) for p in layer_files]
        self.scales = {s: _read(folder / "scales" / f"{s}.txt") for s in SCALE_NAMES}
        self.output = _read(folder / "output.txt")
        self.repair = _read(folder / "repair.txt")
        self.tasks = {p.stem: parse_task(p) for p in sorted((folder / "tasks").glob("*.txt"))}
        missing = [t for t in TASKS if t not in self.tasks]
        if missing:
            raise SarkitError(
                f"{folder / 'tasks'}: missing task file(s) "
                + ", ".join(f"{t}.txt" for t in missing)
            )

    def task(self, name: str) -> TaskSpec:
        if name not in self.tasks:
            raise SarkitError(f"unknown task '{name}'; known: {', '.join(sorted(self.tasks))}")
        return self.tasks[name]

    @staticmethod
    def fill(template: str, values: dict[str, str], source: str) -> str:
        try:
            return string.Template(template).substitute(values)
        except KeyError as exc:
            raise SarkitError(f"{source}: unknown placeholder ${exc.args[0]}") from None
        except ValueError as exc:
            raise SarkitError(f"{source}: bad placeholder ({exc}); write $$ for a dollar") from None

    def build(
        self,
        record: dict,
        task: TaskSpec,
        stage: str,
        parent: dict | None,
        parent_note: str | None = None,
    ) -> Prompt:
        values = prompt_values(record, task, stage, parent, parent_note)
        f = self.folder
        parts = [self.fill(self.tile, values, str(f / "tile.txt"))]
        parts += [self.fill(text, values, str(path)) for path, text in self.layers]
        parts.append(self.fill(self.scales[stage], values, str(f / "scales" / f"{stage}.txt")))
        parts.append(self.fill(task.instructions, values, task.source))
        parts.append(self.fill(self.output, values, str(f / "output.txt")))
        system = self.fill(self.system, values, str(f / "system.txt"))
        return Prompt(system.strip(), "\n\n".join(p.strip() for p in parts))

    def repair_text(self, task: TaskSpec, problem: str) -> str:
        values = {"missing_fields": problem, "answer_template": answer_template(task)}
        return self.fill(self.repair, values, str(self.folder / "repair.txt")).strip()


def answer_template(task: TaskSpec) -> str:
    return "\n".join(f"{f.name}: {f.prefix} <{f.guide}>" for f in task.fields)


def _fmt(x: object, digits: int = 2) -> str:
    try:
        text = f"{float(x):.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    except (TypeError, ValueError):
        return "unknown"


def prompt_values(
    record: dict, task: TaskSpec, stage: str, parent: dict | None, parent_note: str | None
) -> dict[str, str]:
    geo = record.get("geo") or {}
    place = geo.get("place") or {}
    center = geo.get("center") or [None, None]
    name = place.get("name") or "unknown place"
    admin1 = place.get("admin1") or "unknown region"
    country = place.get("country") or "unknown country"
    dist = place.get("distance_km")
    if place:
        location = f"near {name}, {admin1}, {country}"
        if dist is not None:
            location += f" ({_fmt(dist, 1)} km from the place's centre)"
    else:
        location = "unknown (the record has no geographic position)"
    lon, lat = center[0], center[1]
    band = str(record.get("band") or "unknown")
    window = record.get("window") or []
    tile_px = str(int(window[2])) if len(window) >= 4 else "unknown"
    if parent and parent.get("texts"):
        parent_text = "\n".join(f"- {k}: {v}" for k, v in parent["texts"].items())
    else:
        parent_text = f"(none: {parent_note or 'no larger-scale description is available'}; "
        parent_text += "describe this tile on its own)"
    return {
        "tile_id": str(record.get("id")),
        "scene": Path(str(record.get("scene") or "unknown")).name,
        "scale": str(record.get("scale") or stage),
        "scale_name": SCALE_NAMES[stage],
        "sensor": str(record.get("sensor") or "unknown"),
        "band": band,
        "wavelength": WAVELENGTHS.get(band, "wavelength unknown"),
        "polarization": str(record.get("polarization") or "unknown"),
        "pixel_m": _fmt(record.get("pixel_m")),
        "ground_m": _fmt(record.get("ground_m"), 0),
        "tile_px": tile_px,
        "lat": f"{float(lat):.4f}" if lat is not None else "unknown",
        "lon": f"{float(lon):.4f}" if lon is not None else "unknown",
        "location": location,
        "place": str(name),
        "admin1": str(admin1),
        "country": str(country),
        "distance_km": _fmt(dist, 1) if dist is not None else "unknown",
        "parent_id": str(record.get("parent") or "none"),
        "parent_scale": str((parent or {}).get("scale") or "larger"),
        "parent_text": parent_text,
        "task": task.name,
        "field_names": ", ".join(task.field_names),
        "field_guide": "\n".join(f"- {f.name}: {f.guide}" for f in task.fields),
        "answer_template": answer_template(task),
        "missing_fields": "",
    }
