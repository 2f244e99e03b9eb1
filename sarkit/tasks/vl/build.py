"""Caption, retrieval and VQA data from annotations (the paper's Fig. 13).

Captions state each category, its count and where it lies on a 3x3 region grid, in one of
five language templates (chosen per image by a seeded draw, so a rebuild is identical);
landform masks add the main landform and the others present. VQA pairs cover the six
question types; a type the annotations cannot answer is not made (no boxes: no position;
no landform masks: no landform questions), and the summary says so. Images are split 4:1
(seeded) unless a test list is given; every question of an image shares its split.

Outputs in the folder ``-o``::

    caption.jsonl  retrieval.jsonl  one line per image: id, path, split, captions, objects
    vqa.jsonl                       one line per question: id, image, path, split, type,
                                    question, answer
    answers.json                    the answer vocabulary (all, and per question type)
    summary.json                    counts, what was not made and why, problems met
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sarkit.atomic import atomic_open, write_text
from sarkit.errors import SarkitError
from sarkit.tasks.vl.annotations import Annotations, Image

REGIONS = (
    "upper left",
    "upper middle",
    "upper right",
    "middle left",
    "center",
    "middle right",
    "lower left",
    "lower middle",
    "lower right",
)
QUESTION_TYPES = (
    "count",
    "recognition",
    "position",
    "main_landform",
    "all_landforms",
    "region_landform",
)
TASKS = ("caption", "retrieval", "vqa")
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
#: a landform is "present" when it covers at least this share of the labelled pixels
LANDFORM_SHARE = 0.05

# Five templates for one category clause; {n} is a number word, {cats} the (plural) name,
# {where} the regions. Whole-caption variety comes from the template drawn per image.
TEMPLATES = (
    "there {be} {n} {cats} in the {where} of the image",
    "a SAR image with {n} {cats} located in the {where}",
    "{n} {cats} can be seen in the {where}",
    "the scene shows {n} {cats} at the {where}",
    "{n} {cats} {appear} in the {where} of this SAR image",
)
TEMPLATES_NO_POSITION = (
    "there {be} {n} {cats} in the image",
    "a SAR image with {n} {cats}",
    "{n} {cats} can be seen",
    "the scene shows {n} {cats}",
    "{n} {cats} {appear} in this SAR image",
)
EMPTY_TEMPLATES = (
    "no target is visible in this SAR image",
    "a SAR image with no target in it",
    "no target can be seen",
    "the scene shows no target",
    "there is no target in the image",
)
LANDFORM_TEMPLATES = (
    "the land cover is mainly {main}{others}",
    "a SAR image mostly covered by {main}{others}",
    "{main} dominates the scene{others}",
    "the scene is largely {main}{others}",
    "most of the image shows {main}{others}",
)


def region_of(x: float, y: float, w: int, h: int) -> int:
    """Region number 1..9 of a point, row by row from the upper left."""
    col = min(2, max(0, int(3 * x / w)))
    row = min(2, max(0, int(3 * y / h)))
    return row * 3 + col + 1


def number_word(n: int) -> str:
    return NUMBERS[n] if n < len(NUMBERS) else str(n)


def plural(name: str, n: int) -> str:
    if n == 1 or name.endswith("s"):
        return name
    return name + "s"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def object_regions(img: Image) -> dict[str, list[int]]:
    """{category: region numbers of its objects (with repeats)}, in first-seen order."""
    out: dict[str, list[int]] = {}
    for obj in img.objects:
        c = obj.centre()
        out.setdefault(obj.category, [])
        if c is not None:
            out[obj.category].append(region_of(c[0], c[1], img.width, img.height))
    return out


def landform_shares(counts: dict[str, int] | None) -> list[tuple[str, float]]:
    """(landform, share of labelled pixels), largest first; empty when nothing is labelled."""
    if not counts:
        return []
    total = sum(counts.values())
    if total == 0:
        return []
    return sorted(((k, v / total) for k, v in counts.items() if v), key=lambda kv: (-kv[1], kv[0]))


def caption(img: Image, template: int, has_boxes: bool) -> str:
    """One caption of an image in template `template` (0..4)."""
    clauses = []
    counts = Counter(o.category for o in img.objects)
    regions = object_regions(img)
    for cat in dict.fromkeys(o.category for o in img.objects):
        n = counts[cat]
        fill = {
            "n": number_word(n),
            "cats": plural(cat, n),
            "be": "is" if n == 1 else "are",
            "appear": "appears" if n == 1 else "appear",
        }
        if has_boxes and regions[cat]:
            where = [REGIONS[r - 1] for r in sorted(set(regions[cat]))]
            fill["where"] = _join(where) + (" region" if len(where) == 1 else " regions")
            clauses.append(TEMPLATES[template].format(**fill))
        else:
            clauses.append(TEMPLATES_NO_POSITION[template].format(**fill))
    shares = landform_shares(img.landforms)
    present = [k for k, s in shares if s >= LANDFORM_SHARE]
    if present:
        others = f", with {_join(present[1:])}" if len(present) > 1 else ""
        clauses.append(LANDFORM_TEMPLATES[template].format(main=present[0], others=others))
    if not clauses:
        clauses.append(EMPTY_TEMPLATES[template])
    text = "; ".join(clauses)
    return text[0].upper() + text[1:] + "."


@dataclass
class Question:
    type: str
    question: str
    answer: str


def questions(
    img: Image, ann: Annotations, rng: random.Random, region_questions: int = 2
) -> list[Question]:
    """The questions the annotations can answer for one image (see the module doc)."""
    out: list[Question] = []
    counts = Counter(o.category for o in img.objects)
    regions = object_regions(img)
    # an image without targets: "how many" of each category (up to 3) has the answer 0
    asked = list(counts) or ann.categories[:3]
    for cat in asked:
        out.append(
            Question("count", f"How many {plural(cat, 2)} are in the image?", str(counts[cat]))
        )
    if len(counts) == 1:
        out.append(
            Question("recognition", "What kind of target is in the image?", next(iter(counts)))
        )
    if ann.has_boxes:
        for cat, regs in regions.items():
            if regs and len(set(regs)) == 1:
                n = counts[cat]
                subject = f"is the {cat}" if n == 1 else f"are the {plural(cat, n)}"
                out.append(
                    Question(
                        "position",
                        f"In which region (1 to 9, row by row from the upper left) {subject}"
                        " located?",
                        str(regs[0]),
                    )
                )
    shares = landform_shares(img.landforms)
    if shares:
        out.append(
            Question("main_landform", "What is the main landform in the image?", shares[0][0])
        )
        present = sorted(k for k, s in shares if s >= LANDFORM_SHARE)
        out.append(
            Question("all_landforms", "What landforms are in the image?", ", ".join(present))
        )
        cells = []
        for r, cell in enumerate(img.region_landforms or [], start=1):
            cell_shares = landform_shares(cell)
            labelled = sum(cell.values())
            size = img.width * img.height / 9
            if cell_shares and labelled >= 0.5 * size:
                cells.append((r, cell_shares[0][0]))
        # regions whose cover differs from the image's main landform are asked first: where a
        # region's answer is the main landform, the question can be answered without the region
        other = [c for c in cells if c[1] != shares[0][0]]
        same = [c for c in cells if c[1] == shares[0][0]]
        picked = rng.sample(other, min(region_questions, len(other)))
        picked += rng.sample(same, min(region_questions - len(picked), len(same)))
        for r, name in sorted(picked):
            out.append(
                Question(
                    "region_landform",
                    f"What is the main landform in the {REGIONS[r - 1]} region?",
                    name,
                )
            )
    return out


@dataclass
class BuildOptions:
    source: Path
    output: Path
    tasks: tuple[str, ...] = TASKS
    images: Path | None = None
    classes: str | None = None
    objects: str | None = None
    test_fraction: float = 0.2
    test_list: Path | None = None
    seed: int = 0
    region_questions: int = 2
    extra: dict = field(default_factory=dict)


def split_of(names: list[str], fraction: float, seed: int, test: set[str] | None) -> dict[str, str]:
    """name -> train/test: the given test list, else a seeded shuffle with `fraction` test."""
    if test is not None:
        return {n: "test" if n in test else "train" for n in names}
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * fraction)
    if fraction > 0 and len(order) > 1:
        n_test = min(len(order) - 1, max(1, n_test))
    return {n: ("test" if i < n_test else "train") for i, n in enumerate(order)}


def _check_test_list(test: set[str], names: list[str], source: Path) -> None:
    """A test list that names no image would silently train on everything: refuse it, and
    say how the names look; names it holds beyond the images are counted on stderr."""
    missing = test - set(names)
    if test and len(missing) == len(test):
        raise SarkitError(
            f"--test-list {source}: none of its {len(test)} name(s) is an image of --from "
            f"(it has {sorted(test)[0]!r}; image names look like {sorted(names)[0]!r})"
        )
    if missing:
        from sarkit import log

        log.warn(
            f"--test-list {source}: {len(missing)} of its {len(test)} name(s) are no image "
            f"of --from (first: {sorted(missing)[0]!r}); they are left out"
        )


def _rel(path: Path, out: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), out.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def build(ann: Annotations, options: BuildOptions) -> dict:
    """Write the task files into ``options.output``; return the summary (also written)."""
    out = Path(options.output)
    if out.exists() and not out.is_dir():
        raise SarkitError(f"-o {out}: exists and is not a folder")
    if not ann.images:
        raise SarkitError(f"{ann.source}: no usable image ({len(ann.problems)} problem(s))")
    test = None
    if options.test_list is not None:
        try:
            lines = Path(options.test_list).read_text().split()
        except OSError as exc:
            raise SarkitError(f"--test-list {options.test_list}: {exc.strerror}") from None
        test = {Path(x).stem if "/" not in x else x for x in lines}
        _check_test_list(test, [i.name for i in ann.images], options.test_list)
    split = split_of([i.name for i in ann.images], options.test_fraction, options.seed, test)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(options.seed)
    image_rows, vqa_rows = [], []
    for img in ann.images:
        first = rng.randrange(len(TEMPLATES))
        caps = [caption(img, (first + k) % len(TEMPLATES), ann.has_boxes) for k in range(5)]
        row = {
            "id": img.name,
            "path": _rel(img.path, out),
            "split": split[img.name],
            "captions": caps,
            "objects": [
                {"category": o.category, **({"box": list(o.box)} if o.box else {})}
                for o in img.objects
            ],
        }
        if img.landforms is not None:
            row["landforms"] = img.landforms
        image_rows.append(row)
        for k, q in enumerate(questions(img, ann, rng, options.region_questions)):
            vqa_rows.append(
                {
                    "id": f"{img.name}/q{k}",
                    "image": img.name,
                    "path": row["path"],
                    "split": split[img.name],
                    "type": q.type,
                    "question": q.question,
                    "answer": q.answer,
                }
            )
    not_made = {}
    if not ann.has_boxes:
        not_made["position"] = f"{ann.kind} annotations give no boxes: no target position is known"
    if not ann.landforms:
        why = "no landform masks in the source (never invented from boxes)"
        for t in ("main_landform", "all_landforms", "region_landform"):
            not_made[t] = why
    if not ann.categories:
        for t in ("count", "recognition", "position"):
            not_made[t] = "no object classes in the source"
    written = {}
    for task in options.tasks:
        rows = vqa_rows if task == "vqa" else image_rows
        path = out / f"{task}.jsonl"
        with atomic_open(path, encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        written[task] = len(rows)
    by_type = Counter(r["type"] for r in vqa_rows)
    summary = {
        "source": ann.source,
        "kind": ann.kind,
        "images": len(ann.images),
        "splits": dict(Counter(split.values())),
        "objects": sum(len(i.objects) for i in ann.images),
        "categories": ann.categories,
        "landforms": ann.landforms,
        "written": written,
        "questions": {t: by_type.get(t, 0) for t in QUESTION_TYPES if t not in not_made},
        "not_made": not_made,
        "problems": len(ann.problems),
        "first_problems": ann.problems[:20],
        "seed": options.seed,
    }
    if "vqa" in options.tasks:
        vocab = {
            "answers": sorted({r["answer"] for r in vqa_rows}),
            "by_type": {
                t: sorted({r["answer"] for r in vqa_rows if r["type"] == t}) for t in by_type
            },
        }
        write_text(out / "answers.json", json.dumps(vocab, indent=2, ensure_ascii=False) + "\n")
    write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


class FromAnnotations:
    """The `finetune build --from ANN` builder (caption/retrieval/VQA files into ``-o``)."""

    name = "vl-from-annotations"
    trigger = "--from"
    output_is_folder = True

    @property
    def options(self):
        from sarkit.hookspecs import HeadOption
        from sarkit.ranges import number_in

        build = ("build",)
        return (
            HeadOption(
                "--from",
                "Detection or segmentation annotations (COCO .json, VOC .xml or folder, mask "
                "PNG folder, or class subfolders): caption/retrieval/VQA files into -o FOLDER.",
                modes=build,
            ),
            HeadOption(
                "--tasks",
                "With --from: which files to write.",
                default=",".join(TASKS),
                modes=build,
            ),
            HeadOption(
                "--classes",
                "With --from masks or class folders: VALUE=NAME entries ('1=water,2=urban', "
                "'0,255,0=ship'); mask values not named are unlabelled.",
                modes=build,
            ),
            HeadOption(
                "--objects",
                "With --from masks: classes counted as targets (connected components); the "
                "other named classes are landforms.",
                modes=build,
            ),
            HeadOption(
                "--test-fraction",
                "With --from: the seeded test share of the images (4:1).",
                default=0.2,
                type=number_in(0, 1, hi_open=True),
                modes=build,
            ),
            HeadOption(
                "--test-list",
                "With --from: a file naming the test images (one per line) instead.",
                modes=build,
            ),
            HeadOption("--split-seed", "With --from: split and template seed.", 0, int, (), build),
            HeadOption(
                "--region-questions",
                "With --from masks: region landform questions per image.",
                2,
                int,
                (),
                build,
            ),
        )

    def build(self, options, output: Path) -> str:
        from sarkit.errors import UsageError
        from sarkit.tasks.vl.annotations import read_annotations

        tasks = tuple(t.strip() for t in str(options.get("tasks") or "").split(",") if t.strip())
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise UsageError(f"--tasks {options.get('tasks')}: use some of {', '.join(TASKS)}")
        images = options.get("images")
        source = Path(options["from"])
        ann = read_annotations(
            source, Path(images) if images else None, options.get("classes"), options.get("objects")
        )
        test_list = options.get("test_list")
        summary = build(
            ann,
            BuildOptions(
                source,
                Path(output),
                tasks,
                test_fraction=float(
                    options["test_fraction"] if options.get("test_fraction") is not None else 0.2
                ),
                test_list=Path(test_list) if test_list else None,
                seed=int(options.get("split_seed") or 0),
                region_questions=int(
                    options["region_questions"]
                    if options.get("region_questions") is not None
                    else 2
                ),
            ),
        )
        return summary_line(summary, Path(output))


def summary_line(s: dict, output: Path) -> str:
    """The build summary for stderr: what was written, what was not made and why."""
    files = ", ".join(f"{t}.jsonl {n}" for t, n in s["written"].items())
    questions = ", ".join(f"{t} {n}" for t, n in s["questions"].items() if n)
    line = f"{s['images']} images ({s['splits']}), {s['objects']} targets -> {output}: {files}"
    if "vqa" in s["written"]:
        line += f"; questions: {questions or 'none'}"
    reasons: dict[str, list[str]] = {}
    for qtype, why in s["not_made"].items():
        reasons.setdefault(why, []).append(qtype)
    for why, types in reasons.items():
        line += f"; not made: {', '.join(types)} ({why})"
    if s["problems"]:
        line += f"; {s['problems']} annotation problem(s), first: {s['first_problems'][0]}"
    return line
