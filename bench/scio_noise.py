"""SCIO screening and rewriting quality on real MSTAR chips with known corrupted segments.

Records: MSTAR SOC train chips with texts built from their class (tests/test_pretrain_data),
20 % of the segments swapped for the same field of a chip of another class
(`corrupt`, tests/test_scio_learn.py), or (`--corruption lookalike`) rewritten in their own
words for a look-alike class, T62 for T72 (`corrupt_lookalike` below). A tiny SAR-KnowLIP
pretrains on the noisy records; then

1. `sarkit scio --screen-only` with no cap gives every segment's dITC, dITM and aITC (the
   segment by itself); the noise pool is recomputed here for each rule (arms, margins, cap)
   and its precision and recall against the known corruptions printed as a table;
2. (--rewrite) a full `sarkit scio` round with the chosen defaults: the share of rewritten
   segments that name the chip's class again, and how often a rewrite is worse than the
   text it replaced (the old one named the class, the rewrite does not).

    python bench/scio_noise.py --per-class 40 --steps 300 [--rewrite]
    python bench/scio_noise.py --per-class 30 --steps 160 --decoder-loss mlm   # screening only
    python bench/scio_noise.py --per-class 30 --steps 160 --decoder-loss mlm --cross-fit 2
    python bench/scio_noise.py ... --vision vitc_tiny --vision-args patch_size=8,... --image-size 88
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))
from test_pretrain_data import MSTAR_CLASSES, TEMPLATES  # noqa: E402
from test_scio_learn import JUDGE, corrupt, precision_recall  # noqa: E402

MODEL = JUDGE  # the slow test's judge: the settings test_pretrain_learn found to learn MSTAR


def identifiers(label: int) -> list[str]:
    name, kind, shape = MSTAR_CLASSES[label]
    return [name.lower(), kind.lower(), shape.lower()]


def names_class(text: str, label: int) -> bool:
    """The text names the chip's class (designation, kind or silhouette) and no other's."""
    t = text.lower()
    mine = identifiers(label)
    others = {x for c in range(len(MSTAR_CLASSES)) if c != label for x in identifiers(c)}
    return any(x in t for x in mine) and not any(x in t for x in others - set(mine))


def flat_scores(scores: dict) -> dict[tuple[int, str], list[float]]:
    return {(k, f): v for k, fs in scores.items() for f, v in fs.items()}


def auc(pairs: list[tuple[float, bool]]) -> float:
    """P(a corrupted segment scores above a clean one), ties half (Mann-Whitney)."""
    import numpy as np
    from scipy.stats import rankdata

    x = np.array([p[0] for p in pairs], float)
    y = np.array([p[1] for p in pairs], bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return float("nan")
    r = rankdata(x)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def sarkit(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sarkit", *map(str, args)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"sarkit {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


# Each class's look-alikes, nearest first (shape and running gear): the misidentification an
# LLM captioner makes, where a swapped-in segment of any other class is an easier error.
LOOKALIKE = {0: (9, 1), 1: (4, 0), 2: (3, 8), 3: (4, 2), 4: (3, 1), 5: (9, 0), 6: (7,),
             7: (6,), 8: (2, 3), 9: (0, 1)}  # fmt: skip


def corrupt_lookalike(records: list[dict], rate: float, seed: int = 0) -> set[tuple[str, str]]:
    """Rewrite `rate` of all segments, in place, in their own template's words for a
    look-alike class (T62 for T72, BTR60 for BTR70, ...); a slot whose template cannot tell
    the two apart (T62 and T72 share their kind) is passed over. Returns the (id, field)
    pairs corrupted."""
    import random

    rng = random.Random(seed)
    slots = [(k, f) for k, r in enumerate(records) for f in r["texts"]]
    rng.shuffle(slots)
    want = round(rate * len(slots))
    fill = [dict(zip(("name", "kind", "shape"), c, strict=True)) for c in MSTAR_CLASSES]
    bad = set()
    for k, f in slots:
        if len(bad) == want:
            break
        label, text = records[k]["label"], records[k]["texts"][f]
        template = next(t for t in TEMPLATES[f] if t.format(**fill[label]) == text)
        for other in LOOKALIKE[label]:
            new = template.format(**fill[other])
            if new != text:
                records[k]["texts"][f] = new
                bad.add((records[k]["id"], f))
                break
    return bad


def main() -> None:
    from test_pretrain_data import mstar_records, write_jsonl

    from sarkit.scio.screen import decide

    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--vision", default=None, help="the judge's ViT (default: the slow test's)")
    ap.add_argument("--vision-args", default=None, help="timm keywords for --vision")
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument(
        "--corruption",
        choices=("swap", "lookalike"),
        default="swap",
        help="swap: the same field of a chip of another class; lookalike: the segment's own "
        "template for a look-alike class (T62 for T72), a misidentification",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--decoder-loss",
        default="both",
        help="pretrain's; mlm is cheaper, "
        "but only `both` (or lm) trains the decoder that --rewrite needs",
    )
    ap.add_argument("--rewrite", action="store_true")
    ap.add_argument("--rewrite-steps", type=int, default=100)
    ap.add_argument("--rule", default="segment", help="--rewrite's scio rule")
    ap.add_argument("--segment-z", type=float, default=3.0)
    ap.add_argument("--itc-margin", type=float, default=0.0)
    ap.add_argument("--itm-margin", type=float, default=0.01)
    ap.add_argument("--itc-alone-margin", type=float, default=0.1)
    ap.add_argument("--field-cap", type=float, default=0.3)
    ap.add_argument(
        "--cross-fit",
        type=int,
        default=1,
        help="K folds: each fold screened by a judge trained on the others (each judge "
        "--steps steps); 1 = one judge trained on all records and screening them",
    )
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    if a.rewrite and a.cross_fit > 1:
        sys.exit("--rewrite runs one scio round from one judge: not with --cross-fit")
    work = a.work or Path(tempfile.mkdtemp(prefix="scio-noise-"))
    work.mkdir(parents=True, exist_ok=True)
    recs = mstar_records(SHARED / "mstar", "train", a.per_class, seed=a.seed)
    bad = (corrupt if a.corruption == "swap" else corrupt_lookalike)(recs, a.rate, seed=a.seed)
    path = write_jsonl(work / "noisy.jsonl", recs)
    model = list(MODEL)
    model[model.index("--image-size") + 1] = str(a.image_size)
    if a.vision:
        model[model.index("--vision") + 1] = a.vision
    if a.vision_args:
        model += ["--vision-args", a.vision_args]
    k = max(1, a.cross_fit)
    # fold f's records are screened by a judge trained on the other folds (k = 1: on all)
    folds = [[r for i, r in enumerate(recs) if k == 1 or i % k != f] for f in range(k)]
    held = [[r for i, r in enumerate(recs) if k == 1 or i % k == f] for f in range(k)]
    t_train = t_screen = 0.0
    screened, reused = [], True
    for f in range(k):
        name = "" if k == 1 else f"-fold{f}"
        train_path = path if k == 1 else write_jsonl(work / f"train{name}.jsonl", folds[f])
        held_path = path if k == 1 else write_jsonl(work / f"held{name}.jsonl", held[f])
        base = work / f"base{name}"
        t0 = time.perf_counter()
        if not (base / "model.safetensors").exists():
            reused = False
            sarkit("pretrain", train_path, "-o", base, *model, "--decoder-loss", a.decoder_loss,
                   "--max-steps", a.steps, "--epochs", 1000, "--save-every", 0)  # fmt: skip
        t_train += time.perf_counter() - t0
        t0 = time.perf_counter()
        proc = sarkit("scio", held_path, "--init", base, "-o", work / f"screen{name}",
                      "--screen-only", "--field-cap", 1, "--screen-batch", 32)  # fmt: skip
        t_screen += time.perf_counter() - t0
        screened += [json.loads(line) for line in proc.stdout.splitlines() if line]
    order = {r["id"]: i for i, r in enumerate(recs)}
    screened.sort(key=lambda r: order[r["id"]])
    index = {r["id"]: k for k, r in enumerate(screened)}
    scores = {k: {f: [s["ditc"], s["ditm"], s["aitc"]] for f, s in (r.get("scio") or {}).items()}
              for k, r in enumerate(screened)}  # fmt: skip
    bad_k = {(index[i], f) for i, f in bad}
    trained = "pretrained run reused from --work" if reused else f"pretrain {a.steps} steps"
    if k > 1:
        trained += f" per judge, {k} cross-fitted judges"
    print(f"{len(recs)} records, {len(bad)} of {8 * len(recs)} segments corrupted; "
          f"{trained} {t_train:.0f} s, screening {t_screen:.0f} s")  # fmt: skip
    ditc = [(-v[0], key in bad_k) for key, v in flat_scores(scores).items()]
    ditm = [(v[1], key in bad_k) for key, v in flat_scores(scores).items()]
    aitc = [(v[2], key in bad_k) for key, v in flat_scores(scores).items()]
    print(f"AUC corrupted vs clean: -dITC {auc(ditc):.3f}, dITM {auc(ditm):.3f}, "
          f"aITC {auc(aitc):.3f}")  # fmt: skip
    print("| ITC margin | ITM margin | ITC alone | segment z | cap | flagged | precision "
          "| recall |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")

    def row(mi: float | None, mm: float, cap: float, alone: float | None = None,
            z: float | None = None) -> None:  # fmt: skip
        """None: that arm off (mi None: the paper's arm off)."""
        rules = [n for n, on in (("paper", mi is not None), ("itc", alone is not None),
                                 ("segment", z is not None)) if on]  # fmt: skip
        pool = decide(scores, rules, mi or 0.0, mm, cap, alone or 0.0, z or 0.0)
        flagged = {(k, f) for k, names in pool.items() for f in names}
        p, r = precision_recall(flagged, bad_k)
        mi_s = "off" if mi is None else f"{mi:g}"
        mm_s = "off" if mi is None else "none" if mm < 0 else f"{mm:g}"
        alone_s = "off" if alone is None else f"{alone:g}"
        z_s = "off" if z is None else f"{z:g}"
        print(f"| {mi_s} | {mm_s} | {alone_s} | {z_s} | {cap:g} | {len(flagged)} | {p:.3f} "
              f"| {r:.3f} |")  # fmt: skip

    for cap in (1.0, 0.5, 0.3, 0.2):
        for mi in (0.0, 0.02, 0.05, 0.1, 0.2):
            for mm in (-1.0, 0.0, 0.01):  # -1: "none", no ITM confirmation (dITM > -1 always)
                row(mi, mm, cap)
    # either arm: the ITM-confirmed candidates, or a strong dITC alone (the defaults' rule)
    for cap in (1.0, 0.3):
        for mi, mm in ((0.0, 0.01), (0.0, 0.02), (0.05, 0.01)):
            for alone in (0.05, 0.1, 0.15, 0.2):
                row(mi, mm, cap, alone)
    # the segment by itself: aITC above its field's median by z MADs (the default arm)
    for cap in (1.0, 0.3, 0.2):
        for z in (1.5, 2.0, 2.5, 3.0, 4.0, 5.0):
            row(None, 0.0, cap, z=z)
    for z in (2.0, 3.0, 4.0):
        row(0.0, 0.01, 0.3, 0.1, z=z)  # with the former defaults' two arms
        row(None, 0.0, 0.3, 0.2, z=z)  # with a strong dITC alone
    if not a.rewrite:
        return
    sarkit("scio", path, "--init", work / "base", "-o", work / "scio", *model,
           "--max-steps", a.rewrite_steps, "--rule", a.rule, "--segment-z", a.segment_z,
           "--itc-margin", a.itc_margin,
           "--itm-margin", a.itm_margin, "--itc-alone-margin", a.itc_alone_margin,
           "--field-cap", a.field_cap, "--screen-batch", 32,
           "--save-every", 0)  # fmt: skip
    refined = [json.loads(x) for x in (work / "scio" / "refined.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in recs}
    n = {"rewritten": 0, "right": 0, "worse": 0, "removed": 0, "fixed": 0, "of_bad": 0}
    for r in refined:
        label = by_id[r["id"]]["label"]
        for f, seg in (r.get("scio") or {}).items():
            if seg["decision"] == "removed":
                n["removed"] += 1
            if seg["decision"] != "rewritten":
                continue
            n["rewritten"] += 1
            ok = names_class(r["texts"][f], label)
            was_ok = names_class(r["texts_original"][f], label)
            n["right"] += ok
            n["worse"] += was_ok and not ok
            if (r["id"], f) in bad:
                n["of_bad"] += 1
                n["fixed"] += ok
    print(f"rewritten {n['rewritten']} (of them corrupted before: {n['of_bad']}), removed "
          f"{n['removed']}; rewrites naming the class: {n['right']}/{n['rewritten']}; "
          f"corrupted segments fixed: {n['fixed']}/{n['of_bad']}; worse than before: "
          f"{n['worse']}/{n['rewritten']}")  # fmt: skip


if __name__ == "__main__":
    main()
