"""`sarkit scio` end to end on real MSTAR chips with tiny models, and its screening parts.

One tiny pretrain run (module fixture) is the --init of every run here; stages train a step
or two, enough to check the mechanics: decisions per segment, refined records, report,
resume after kill -9 during screening, bad input passed through and counted, --ablation.
Whether screening finds real noise is test_scio_learn's question.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import shared
from test_pretrain import TINY
from test_pretrain_data import mstar_records, write_jsonl

from sarkit.model import TERRAIN_FIELDS

SCIO = ["--max-steps", "1", "--batch-size", "4", "--warmup-steps", "1", "--workers", "0",
        "--log-every", "1", "--screen-batch", "1", "--max-new-tokens", "6"]  # fmt: skip


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


# ---------------------------------------------------------------- screening parts


@pytest.fixture(scope="module")
def tiny_judge():
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig, Momentum
    from sarkit.model.text import TextCodec
    from sarkit.scio.screen import Scorer, queue_bank

    torch.manual_seed(0)
    cfg = KnowLIPConfig(vision="tiny", image_size=32, text_layers=1, embed_dim=16,
                        queue_size=12, max_tokens=64)  # fmt: skip
    model = KnowLIP(cfg).eval()
    momentum = Momentum(model, cfg.queue_size, cfg.momentum)
    feats = torch.nn.functional.normalize(torch.randn(24, 16), dim=-1)
    momentum.enqueue(feats[:12], feats[12:], torch.arange(12) % 4 - 4)
    codec = TextCodec.from_pretrained(None, cfg.fields, cfg.max_tokens)
    return Scorer(model, codec, queue_bank(momentum), torch.device("cpu")), codec


def test_batched_screening_equals_one_variant_per_pass(tiny_judge):
    from sarkit.scio.screen import screen_images, screen_naive

    scorer, codec = tiny_judge
    images = torch.randn(2, 1, 32, 32)
    texts = [{f: f"{f} {k} of a bright target" for f in TERRAIN_FIELDS} for k in range(2)]
    texts[1]["Water"] = ""  # an empty segment is not a variant
    segs = [codec.segments(t) for t in texts]
    groups = torch.tensor([-1, -2])  # -1 and -2 are in the queue: kept out of their rows
    batched = screen_images(scorer, images, segs, groups)
    naive = screen_naive(scorer, images, segs, groups)
    assert [len(b) for b in batched] == [8, 7]
    for b, n in zip(batched, naive, strict=True):
        assert b.keys() == n.keys()
        for j in b:
            assert b[j] == pytest.approx(n[j], abs=1e-5)


def test_stage_plan():
    from sarkit.scio.driver import plan
    from sarkit.scio.options import ScioOptions

    names = [n for n, _, _ in plan(ScioOptions(output="o", rounds=2))]
    assert names == ["01-train", "02-screen-r1", "03-train-r1", "04-rewrite-r1",
                     "05-train-r1b", "06-screen-r2", "07-train-r2", "08-rewrite-r2",
                     "09-train-r2b"]  # fmt: skip
    with_init = [n for n, _, _ in plan(ScioOptions(output="o", init="run"))]
    assert with_init == ["01-screen-r1", "02-train-r1", "03-rewrite-r1", "04-train-r1b"]
    asked = plan(ScioOptions(output="o", init="run", epochs_per_stage_given=True))
    assert asked[0][0] == "01-train"


def test_decide_margins_cap_and_one_segment_kept():
    from sarkit.scio.screen import decide

    def paper(scores, mi, mm, cap, itc_alone=None):
        rules = ("paper",) if itc_alone is None else ("paper", "itc")
        return decide(scores, rules, mi, mm, cap, itc_alone if itc_alone is not None else 0.0)

    # 10 records, field A: 4 confirmed (dITC < 0, dITM > 0), one with dITM < 0
    scores = {i: {"A": [-0.1 * (i + 1), 0.1, 5.0], "B": [0.5, -0.1, 5.0]} for i in range(4)}
    scores.update({i: {"A": [0.2, 0.1, 5.0], "B": [0.5, -0.1, 5.0]} for i in range(4, 9)})
    scores[9] = {"A": [-1.0, -0.1, 5.0], "B": [-0.5, 0.2, 5.0]}
    assert paper(scores, 0.0, 0.0, 1.0) == {0: {"A"}, 1: {"A"}, 2: {"A"}, 3: {"A"}, 9: {"B"}}
    # margins: dITC < -0.25 leaves records 2 and 3; dITM > 0.15 leaves none of A
    assert paper(scores, 0.25, 0.0, 1.0) == {2: {"A"}, 3: {"A"}, 9: {"B"}}
    assert paper(scores, 0.0, 0.15, 1.0) == {9: {"B"}}
    # cap 0.2 of 10 A segments: the 2 strongest dITC (records 3, 2)
    assert paper(scores, 0.0, 0.0, 0.2) == {2: {"A"}, 3: {"A"}, 9: {"B"}}
    # the ITC-alone arm: record 9's A (dITC -1.0, dITM -0.1) is noise by its dITC alone
    # (B is confirmed too, dITM 0.2 > 0.15, and stays as the less suspect of its two)
    assert paper(scores, 0.0, 0.15, 1.0, itc_alone=0.5) == {9: {"A"}}
    assert paper(scores, 0.0, 0.0, 1.0, itc_alone=0.35) == {
        0: {"A"}, 1: {"A"}, 2: {"A"}, 3: {"A"}, 9: {"A"}}  # fmt: skip
    # every segment of a text flagged: the least suspect stays
    both = {0: {"A": [-0.3, 0.1, 1.0], "B": [-0.1, 0.1, 1.0]}}
    assert paper(both, 0.0, 0.0, 1.0) == {0: {"A"}}
    with pytest.raises(ValueError, match="unknown screening rule"):
        decide(scores, ("paper", "itm"))


def test_a_journal_from_before_aitc_is_screened_again(tmp_path):
    """A batch journaled by an older version ([dITC, dITM] only, no "v") is not reused: its
    records would lack aITC, which the default rule needs."""
    from sarkit.scio.screen import JOURNAL_VERSION, Journal

    path = tmp_path / "journal.jsonl"
    old = {"batch": 0, "ids": ["a"], "scores": {"0": {"A": [0.1, 0.0]}}, "bad": {}}
    path.write_text(json.dumps(old) + "\n" + json.dumps(dict(old, batch=1, v=JOURNAL_VERSION))
                    + "\n")  # fmt: skip
    book = Journal(path)
    assert book.get(0, ["a"]) is None and book.get(1, ["a"]) is not None
    assert book.get(1, ["b"]) is None  # other records: not reused either


def test_decide_segment_arm_in_each_fields_own_units():
    """aITC z = (aITC - the field's median) / its MAD, by hand: field A's aITC 1..10 has
    median 5.5 and MAD 2.5, so 10 is z 1.8 and 9 is z 1.4; field B's values are ten times
    A's, the same z: the margin is in each field's own units."""
    from sarkit.scio.screen import decide, segment_z

    scores = {i: {"A": [0.0, 0.0, float(i + 1)], "B": [0.0, 0.0, 10.0 * (i + 1)]}
              for i in range(10)}  # fmt: skip
    z = segment_z(scores)
    assert z[(9, "A")] == pytest.approx(1.8) and z[(8, "A")] == pytest.approx(1.4)
    assert z[(9, "B")] == pytest.approx(1.8) and z[(0, "A")] == pytest.approx(-1.8)
    assert decide(scores, ("segment",), z_margin=1.5, field_cap=1.0) == {9: {"A"}}  # B kept
    # at 1.0 both fields of records 8 and 9 pass: B, as suspect as A, is the one kept
    assert decide(scores, ("segment",), z_margin=1.0, field_cap=1.0) == {8: {"A"}, 9: {"A"}}
    # the cap keeps the highest z; too few segments of a field: no z, nothing flagged
    assert decide(scores, ("segment",), z_margin=1.0, field_cap=0.1) == {9: {"A"}}
    few = {i: {"A": [0.0, 0.0, float(i)]} for i in range(7)}
    assert segment_z(few) == {} and decide(few, ("segment",), z_margin=0.0) == {}
    # either arm: the paper's flags record 0's B (dITC -1, dITM 0.5), the segment arm 9's A
    scores[0]["B"] = [-1.0, 0.5, 10.0]
    assert decide(scores, ("paper", "segment"), 0.0, 0.0, 1.0, z_margin=1.5) == {
        0: {"B"}, 9: {"A"}}  # fmt: skip


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained run and 12 MSTAR records (+ 3 bad ones) to refine."""
    from conftest import sarkit

    root = tmp_path_factory.mktemp("scio")
    recs = mstar_records(shared("mstar"), "train", 2)[:12]
    write_jsonl(root / "train.jsonl", recs)
    sarkit("pretrain", root / "train.jsonl", "-o", root / "base", *TINY, "--max-steps", "3",
           "--max-tokens", "64", "--save-every", "0", check=0)  # fmt: skip
    bad = [
        dict(recs[0], id="one-segment", texts={"Terrain": "flat ground"}),
        dict(recs[1], id="extra-field", texts={**recs[1]["texts"], "Weather": "rain"}),
        dict(recs[2], id="no-tile", path=str(root / "missing.jpeg")),
    ]
    write_jsonl(root / "mixed.jsonl", recs[:6] + bad + recs[6:])
    heldout = mstar_records(shared("mstar"), "val", 1)
    write_jsonl(root / "heldout.jsonl", heldout)
    return root


def scio_args(base, run) -> list:
    return ["scio", base / "mixed.jsonl", "--init", base / "base", "-o", "-", "--run-dir", run,
            *SCIO, "--rule", "paper,segment", "--itc-margin", "0", "--itm-margin", "0",
            "--field-cap", "0.5"]  # fmt: skip


BAD = ("one-segment", "extra-field", "no-tile")


@pytest.fixture(scope="module")
def refined_run(base):
    """One round from the tiny run, refined records streamed to stdout (-o -)."""
    from conftest import sarkit

    run = base / "run"
    proc = sarkit(*scio_args(base, run), check=0)
    return run, proc


def test_scio_refines_and_reports(base, refined_run):
    run, proc = refined_run
    refined = [json.loads(line) for line in proc.stdout.splitlines()]
    assert refined == read(run / "refined.jsonl")
    given = read(base / "mixed.jsonl")
    assert [r["id"] for r in refined] == [r["id"] for r in given]
    names = sorted(p.name for p in (run / "stages").iterdir())
    assert names == ["01-screen-r1", "02-train-r1", "03-rewrite-r1", "04-train-r1b"]
    # bad input: passed through unchanged, counted on stderr and in the report
    for rec, old in zip(refined, given, strict=True):
        if rec["id"] in BAD:
            assert rec == old
    for why in ("1 fewer than 2 non-empty segments", "1 fields outside the run's layout",
                "1 unreadable tile"):  # fmt: skip
        assert why in proc.stderr and why in (run / "report.md").read_text()
    decisions = {"kept": 0, "rewritten": 0, "removed": 0}
    for rec, old in zip(refined, given, strict=True):
        if rec["id"] in BAD:
            continue
        assert rec["texts_original"] == old["texts"] and "mlm_exclude" not in rec
        assert set(rec["scio"]) == set(TERRAIN_FIELDS)
        for name, seg in rec["scio"].items():
            decisions[seg["decision"]] += 1
            assert isinstance(seg["ditc"], float) and isinstance(seg["ditm"], float)
            assert seg["aitc"] > 0 and isinstance(seg["aitc_z"], float)  # 12 records >= 8
            if seg["decision"] != "kept":  # flagged by one of the two arms asked for
                assert (seg["ditc"] < 0 < seg["ditm"]) or seg["aitc_z"] > 3
            if seg["decision"] == "kept":
                assert rec["texts"][name] == old["texts"][name] and seg["round"] == 1
            elif seg["decision"] == "removed":
                assert name not in rec["texts"] and "rewrite" in seg
            else:
                new = seg["rewrite"]
                assert rec["texts"][name] == new["text"] and new["ditc"] < 0 < new["ditm"]
    flagged = decisions["rewritten"] + decisions["removed"]
    assert 0 < flagged <= 0.5 * 12 * 8  # the field cap holds
    report = (run / "report.md").read_text()
    assert "noise: dITC < 0 and dITM > 0, or aITC > its field's median + 3 MAD" in report
    for name in TERRAIN_FIELDS:
        assert name in report and name in proc.stderr
    for png in ("dITC.png", "aITC_z.png"):  # the segment arm asked for: both histograms
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    from sarkit.model.knowlip import KnowLIP

    KnowLIP.from_run(run / "model")


def test_scio_resumes_an_interrupted_screening(base, refined_run, cli):
    """What kill -9 during screening leaves (finished batches in the journal, a torn last
    line, no records file, nothing after) resumes to the same refined records."""
    run, proc = refined_run
    again = base / "again"
    lines = (run / "stages" / "01-screen-r1" / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 13  # 13 records to screen, one per batch (--screen-batch 1)
    journal = again / "stages" / "01-screen-r1" / "journal.jsonl"
    journal.parent.mkdir(parents=True)
    journal.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    resumed = cli(*scio_args(base, again), check=0)
    assert "5 of 13 batches were done before; not redone" in resumed.stderr
    batches = [json.loads(x)["batch"] for x in journal.read_text().splitlines()]
    assert batches == list(range(13))  # the torn line cut, each batch screened once
    assert resumed.stdout == proc.stdout


def test_scio_ablation_on_a_finished_run(base, refined_run, cli, tmp_path):
    run, _ = refined_run
    proc = cli(*scio_args(base, run), "--ablation", "--heldout", base / "heldout.jsonl", check=0)
    assert "scio: stage" not in proc.stderr  # every SCIO stage was done: none redone
    table = json.loads((run / "ablation.json").read_text())
    assert [a["arm"] for a in table["arms"]] == [
        "SCIO off", "screen + filter", "screen + filter + reconstruct"]  # fmt: skip
    for arm in table["arms"]:
        assert 0.0 <= arm["i2t_r1"] <= 1.0 and 0.0 <= arm["t2i_r1"] <= 1.0
    assert "VQA accuracy: not measured" in proc.stderr
    assert "| SCIO off | no | no |" in (run / "ablation.md").read_text()
    # the same training steps in every arm
    arms = [run / "ablation" / "a-train-1", run / "ablation" / "a-train-2",
            run / "stages" / "02-train-r1", run / "ablation" / "b-train-2",
            run / "stages" / "04-train-r1b"]  # fmt: skip
    assert len({len(read_csv(p)) for p in arms}) == 1
    # Table 8's VQA column: each arm fine-tuned alike on a built VQA file (MSTAR class
    # folders), scored on its test split; the arms are not retrained, nor on a rerun the VQA runs
    src = tmp_path / "chips"
    for k in range(3):
        (src / str(k)).mkdir(parents=True)
        for chip in sorted((shared("mstar") / "train" / str(k)).iterdir())[:3]:
            (src / str(k) / chip.name).symlink_to(chip)
    cli("finetune", "build", "--from", src, "--classes", "0=2S1,1=BMP2,2=BRDM2",
        "--test-fraction", "0.34", "-o", tmp_path / "sft", check=0)  # fmt: skip
    vqa = tmp_path / "sft" / "vqa.jsonl"
    args = [*scio_args(base, run), "--ablation", "--heldout", base / "heldout.jsonl",
            "--ablation-vqa", vqa, "--ablation-vqa-epochs", "1"]  # fmt: skip
    proc = cli(*args, check=0)
    assert "scio ablation: a-train-1" not in proc.stderr
    table = json.loads((run / "ablation.json").read_text())
    folders = sorted((run / "ablation").glob("vqa-*"))
    assert [f.name for f in folders] == ["vqa-scio-off", "vqa-screen-filter",
                                         "vqa-screen-filter-reconstruct"]  # fmt: skip
    assert len({len(read_csv(f)) for f in folders}) == 1  # the same VQA steps for each arm
    for arm in table["arms"]:
        m = arm["vqa"]
        assert 0.0 <= m["acc_overall"] <= 100.0 and m["questions"] > 0
        assert f"| {m['acc_overall']:.1f} % |" in (run / "ablation.md").read_text()
    assert "not measured" not in (run / "ablation.md").read_text()
    assert "VQA: overall accuracy on the test split" in proc.stderr
    again = cli(*args, check=0)
    assert "vqa: acc_overall last" not in again.stderr  # the arms' VQA runs: not redone
    assert json.loads((run / "ablation.json").read_text()) == table


def read_csv(folder) -> list[dict]:
    import csv

    with open(folder / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_scio_from_scratch_screen_only_to_stdout(base, cli, tmp_path):
    proc = cli("scio", base / "train.jsonl", "-o", tmp_path / "s", "--screen-only",
               *TINY, "--max-tokens", "64", "--epochs-per-stage", "1", "--max-steps", "2",
               "--text-lr-scale", "0.5", "--momentum", "0.9", "--grad-accum", "1",
               "--center-crop", "0.7", "--no-augment", "--save-every", "0", "--seed", "1",
               "--precision", "fp32", "--screen-batch", "5", "--max-new-tokens", "5",
               "--rounds", "2", "--itm-segment-negatives", "0.5", "--rule", "paper",
               "--cross-attention-lr-scale", "1", check=0)  # fmt: skip
    screened = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(screened) == 12 and screened == read(tmp_path / "s" / "screened.jsonl")
    stage = json.loads((tmp_path / "s" / "stages" / "01-train" / "model.json").read_text())
    assert stage["itm_segment_negatives"] == 0.5
    for rec in screened:
        assert rec["texts"] == rec["texts_original"]
        noise = [f for f, s in rec["scio"].items() if s["decision"] == "noise"]
        assert rec["mlm_exclude"] == noise
        for seg in rec["scio"].values():
            assert seg["decision"] in ("noise", "kept")
            assert seg["decision"] == "kept" or (seg["ditc"] < 0 and seg["ditm"] > 0)
    assert (tmp_path / "s" / "stages" / "01-train" / "DONE").exists()
    assert not (tmp_path / "s" / "stages" / "03-train-r1").exists()  # stopped after screening


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-o", "-"], 2, "-o -: give the run folder with --run-dir"),
        (["--ablation"], 2, "--ablation needs --heldout"),
        (["--heldout", "x"], 2, "--heldout goes with --ablation"),
        (["--ablation-vqa", "x"], 2, "--ablation-vqa goes with --ablation"),
        (["-o", "o", "--run-dir", "r"], 2, "--run-dir goes with -o - only"),
        (["--screen-only", "--ablation", "--heldout", "x"], 2, "exclude each other"),
        (["--field-cap", "1.5"], 2, "0<=x<=1"),
        (["--itc-margin", "nan"], 2, "x>=0"),
        (["--itc-alone-margin", "-1"], 2, "x>=0"),
        (["--rule", "paper,itm"], 2, "--rule paper,itm: use a comma list of paper, itc, segment"),
        (["--precision", "fp8"], 2, "use fp32, bf16 or fp16"),
    ],
)
def test_scio_usage_errors(tmp_path, cli, args, code, message):
    recs = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "path": "x.png", "texts": {}}])
    full = ["scio", recs, *args] if "-o" in args else ["scio", recs, "-o", tmp_path / "o", *args]
    proc = cli(*full)
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_too_few_segments_for_the_segment_arm_are_named(base, cli, tmp_path):
    """6 records: no field has the 8 screened segments a median and MAD need, so the default
    arm judges none and says so rather than flagging nothing silently."""
    few = write_jsonl(tmp_path / "few.jsonl", read(base / "train.jsonl")[:6])
    proc = cli("scio", few, "--init", base / "base", "-o", tmp_path / "s", "--screen-only",
               "--screen-batch", "6", check=0)  # fmt: skip
    assert "fewer than 8 screened segments of Boundary, Buildings" in proc.stderr
    screened = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(s["decision"] == "kept" and "aitc_z" not in s
               for r in screened for s in r["scio"].values())  # fmt: skip


def test_scio_bad_input_is_one_line(tmp_path, cli):
    one = write_jsonl(tmp_path / "one.jsonl", [{"id": "a", "path": "x.png",
                                                "texts": {"Terrain": "flat"}}])  # fmt: skip
    proc = cli("scio", one, "--init", tmp_path / "nowhere", "-o", tmp_path / "o")
    assert proc.returncode == 1 and "not a run folder" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- under torchrun


@contextlib.contextmanager
def one_thread():
    """One compute thread in this process while the block runs, as a torchrun rank has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _torchrun(args: list, tmp_path):
    """conftest's torchrun, its temporary folders under tmp_path."""
    from conftest import torchrun

    return torchrun(*args, env={"TMPDIR": str(tmp_path)})


def test_screening_sharded_over_two_ranks_equals_one_process(base, tmp_path, cli_in_process):
    """torchrun with 2 processes screens every other batch on each rank and gathers: the
    merged records equal a one-process run's byte for byte, and a run killed during a
    2-rank screening resumes in one process from both ranks' journals, nothing redone.

    One compute thread per process in both (torchrun's default): a matmul's rounding depends
    on the thread count (measured: up to 8e-7 in dITC between 1 and 2 threads; the same
    size between --screen-batch 2 and 5, which is why the shards keep the one-process
    batches rather than dealing out records), and values are written to 7 decimals. The
    one-process runs run in this process (a fresh interpreter costs seconds of imports)."""
    import shutil

    args = ["scio", base / "mixed.jsonl", "--init", base / "base", "--screen-only",
            "--screen-batch", "2", "--itc-margin", "0", "--itm-margin", "0",
            "--field-cap", "0.5"]  # fmt: skip
    with one_thread():
        one = cli_in_process(*args, "-o", tmp_path / "one", check=0)
    two = _torchrun([*args, "-o", tmp_path / "two"], tmp_path)
    assert two.stdout == one.stdout  # rank 0 alone streams the records
    screened = read(tmp_path / "one" / "screened.jsonl")
    assert len(screened) == 15 and sum("scio" in r for r in screened) == 12
    assert any(s["decision"] == "noise" for r in screened for s in r.get("scio", {}).values())
    for name in ("screened.jsonl", "stages/01-screen-r1/records.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    stage = tmp_path / "two" / "stages" / "01-screen-r1"

    def batches(path) -> list[int]:
        return [json.loads(x)["batch"] for x in path.read_text().splitlines()]

    # 13 records in batches of 2: rank 0 screened batches 0, 2, 4, 6 and rank 1 1, 3, 5
    assert batches(stage / "journal.jsonl") == [0, 2, 4, 6]
    assert batches(stage / "journal-rank1.jsonl") == [1, 3, 5]

    # killed mid-screening: each rank had one batch journaled, rank 0 a torn second line
    again = tmp_path / "again" / "stages" / "01-screen-r1"
    again.mkdir(parents=True)
    lines = (stage / "journal.jsonl").read_text().splitlines()
    (again / "journal.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    shutil.copy(stage / "journal-rank1.jsonl", again / "journal-rank1.jsonl")
    with open(again / "journal-rank1.jsonl", "r+") as fh:
        fh.truncate(len(fh.readline()))
    with one_thread():
        resumed = cli_in_process(*args, "-o", tmp_path / "again", check=0)
    assert "2 of 7 batches were done before; not redone" in resumed.stderr
    assert resumed.stdout == one.stdout
    assert batches(again / "journal.jsonl") == [0, 2, 3, 4, 5, 6]  # torn line cut
    assert batches(again / "journal-rank1.jsonl") == [1]  # another rank's file: read only


@pytest.mark.slow  # 60-70 s: the screening test above covers the same sharding under CI
def test_rewriting_sharded_over_two_ranks_equals_one_process(
    base, refined_run, tmp_path, cli_in_process
):
    """From the same screened records and stage model (the module run's first two stages),
    torchrun with 2 processes rewrites every other chunk on each rank: the rewrite stage's
    records and the refined stream equal a one-process rewrite's byte for byte (one compute
    thread in both, as in the screening test)."""
    import shutil

    run, _ = refined_run
    started = {}
    for name in ("one", "two"):
        for stage in ("01-screen-r1", "02-train-r1"):
            shutil.copytree(run / "stages" / stage, tmp_path / name / "stages" / stage)
        started[name] = tmp_path / name
    with one_thread():
        one = cli_in_process(*scio_args(base, started["one"]), check=0)
    two = _torchrun(scio_args(base, started["two"]), tmp_path)
    assert "scio: stage 03-rewrite-r1" in two.stderr  # the first two stages were not redone
    assert "scio: stage 01-screen-r1" not in two.stderr
    assert two.stdout == one.stdout
    done = "stages/03-rewrite-r1/records.jsonl"
    assert (started["two"] / done).read_bytes() == (started["one"] / done).read_bytes()
    # one flagged record per chunk (--screen-batch 1): with 2 or more, both ranks had work
    rewritten = [r for r in read(started["two"] / done)
                 if any("rewrite" in s for s in r.get("scio", {}).values())]  # fmt: skip
    assert len(rewritten) >= 2


def test_ablation_under_two_ranks(base, refined_run, tmp_path):
    """`--ablation` under torchrun with 2 processes, from a finished SCIO run: both ranks train
    the arms (DDP), rank 0 alone scores and writes the table, every arm trains the same steps
    and nothing of the SCIO run is redone."""
    import shutil

    run, _ = refined_run
    two = tmp_path / "two"
    shutil.copytree(run / "stages", two / "stages")
    proc = _torchrun([*scio_args(base, two), "--ablation", "--heldout", base / "heldout.jsonl"],
                     tmp_path)  # fmt: skip
    assert "scio: stage" not in proc.stderr  # every SCIO stage was done: none redone
    assert "scio ablation: a-train-1" in proc.stderr
    table = json.loads((two / "ablation.json").read_text())
    assert [a["arm"] for a in table["arms"]] == [
        "SCIO off", "screen + filter", "screen + filter + reconstruct"]  # fmt: skip
    assert table["records"] == len(read(base / "heldout.jsonl"))
    for arm in table["arms"]:
        assert 0.0 <= arm["i2t_r1"] <= 1.0 and 0.0 <= arm["t2i_r1"] <= 1.0
    assert proc.stderr.count("| SCIO off | no | no |") == 1  # one table: rank 0's
    arms = [two / "ablation" / "a-train-1", two / "ablation" / "a-train-2",
            two / "stages" / "02-train-r1", two / "ablation" / "b-train-2",
            two / "stages" / "04-train-r1b"]  # fmt: skip
    assert len({len(read_csv(p)) for p in arms}) == 1
