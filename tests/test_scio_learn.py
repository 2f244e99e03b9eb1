"""SCIO finds real noise: MSTAR chips with label-built texts, a known 20 % of segments
corrupted, a tiny SAR-KnowLIP trained on the noisy records for a few CPU minutes, then
`sarkit scio --screen-only` with its default thresholds. The noise pool is scored against
the known corruptions: precision must clear the corruption rate (chance) by 0.2, and the
pool must hold a real share of the corruptions (recall), so flagging a handful of sure
cases cannot pass. bench/scio_noise.py measures the same at a larger scale and tabulates
precision and recall against the margins.
"""

from __future__ import annotations

import json
import random

import pytest
from conftest import shared
from test_pretrain_data import mstar_records, write_jsonl

# bench/scio_noise.py's model (the settings test_pretrain_learn found to learn MSTAR), the
# paper's MLM decoder only: screening reads ITC and ITM, and the causal LM would cost ~1.5x
JUDGE = [
    "--vision", "vit_tiny_patch16_224", "--image-size", "64", "--center-crop", "0.6875",
    "--text-layers", "1", "--no-augment", "--max-tokens", "64", "--embed-dim", "128",
    "--queue-size", "256", "--batch-size", "32", "--lr", "1e-3", "--text-lr-scale", "0.1",
    "--warmup-steps", "10", "--momentum", "0.9", "--workers", "1", "--log-every", "10",
]  # fmt: skip
RATE = 0.2
PER_CLASS = 30
STEPS = 160
pytestmark = pytest.mark.slow  # 18 min here: see test_screening_finds_the_corruptions


def corrupt(records: list[dict], rate: float, seed: int = 0) -> set[tuple[str, str]]:
    """Swap `rate` of all segments for the same field of a chip of another class, in place;
    returns the (id, field) pairs corrupted."""
    rng = random.Random(seed)
    slots = [(k, f) for k, r in enumerate(records) for f in r["texts"]]
    chosen = rng.sample(slots, round(rate * len(slots)))
    original = [dict(r["texts"]) for r in records]
    bad = set()
    for k, f in chosen:
        others = [m for m, r in enumerate(records) if r["label"] != records[k]["label"]]
        m = rng.choice(others)
        records[k]["texts"][f] = original[m][f]
        bad.add((records[k]["id"], f))
    return bad


@pytest.fixture
def cli(cli_in_process):
    """In process: no per-command timeout (the judge's training outlasts conftest's 15 min on
    a loaded machine), and torch is imported once."""
    return cli_in_process


def precision_recall(flagged: set, bad: set) -> tuple[float, float]:
    hits = len(flagged & bad)
    return hits / max(1, len(flagged)), hits / max(1, len(bad))


def test_screening_finds_the_corruptions(tmp_path, cli):
    """300 chips, 480 of 2,400 segments corrupted, 160 steps of 32, screened at the defaults
    (arm `segment`: the segment by itself 3 MADs above its field's median). bench/scio_noise.py's
    screening of the same judge (2026-12-03): 335 flagged, precision 0.991, recall 0.692;
    the paper's rule 0.456 / 0.419. The issue's goal is asserted: precision >= 0.7 and
    recall >= 0.5. `make test-all` only."""
    recs = mstar_records(shared("mstar"), "train", PER_CLASS, seed=0)
    bad = corrupt(recs, RATE, seed=0)
    noisy = write_jsonl(tmp_path / "noisy.jsonl", recs)
    run = tmp_path / "judge"
    cli("pretrain", noisy, "-o", run, *JUDGE, "--decoder-loss", "mlm", "--max-steps", STEPS,
        "--epochs", "1000", "--save-every", "0", check=0)  # fmt: skip
    proc = cli("scio", noisy, "--init", run, "-o", tmp_path / "scio", "--screen-only", check=0)
    screened = [json.loads(line) for line in proc.stdout.splitlines() if line]
    assert [r["id"] for r in screened] == [r["id"] for r in recs]
    flagged = {
        (r["id"], f) for r in screened for f, s in r["scio"].items() if s["decision"] == "noise"
    }
    p, r = precision_recall(flagged, bad)
    print(f"noise pool {len(flagged)}, corrupted {len(bad)}: precision {p:.3f}, recall {r:.3f}")
    assert p > RATE + 0.2, (p, r)  # a clear margin above chance
    assert p >= 0.7 and r >= 0.5, (p, r)  # the goal at CPU scale
