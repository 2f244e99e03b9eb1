"""The VL heads end to end on real HRSID ships: build the data, fine-tune from a tiny
pretrain run (or random), evaluate; eval text --plot. Tiny settings (conftest's 2-layer,
64-wide BERT): the figures that mean something are in docs/results.md. The CLI runs in
this process (`sarkit.cli.run`, as a user's command line): a fresh interpreter per command
would spend most of this file's time importing torch, transformers and timm again."""

from __future__ import annotations

import json
import math

import pytest
from conftest import shared, tiny_bert, torchrun

from sarkit import cli

TINY = ["--max-steps", "1", "--batch-size", "8", "--workers", "0", "--log-every", "1"]


def run(capsys, *args, code: int = 0) -> tuple[str, str]:
    """`sarkit ARGS` in this process: (stdout, stderr), checking the exit code."""
    capsys.readouterr()
    got = cli.run([str(a) for a in args])
    out, err = capsys.readouterr()
    assert got == code, f"sarkit {' '.join(map(str, args))} exited {got}\n{err}"
    return out, err


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """The builder's files for HRSID mini, one bad VQA row added, and a tiny pretrain run."""
    hrsid = shared("hrsid_mini")
    root = tmp_path_factory.mktemp("vl")
    out = root / "sft"
    assert cli.run([str(a) for a in (
        "-q", "finetune", "build", "--from", hrsid / "masks", "--images", hrsid / "images",
        "--classes", "0,255,0=ship", "--objects", "ship", "--tasks", "caption,retrieval,vqa",
        "--test-fraction", "0.2", "--split-seed", "1", "--region-questions", "1", "-o", out,
    )]) == 0  # fmt: skip
    with open(out / "vqa.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "bad/q0", "path": "x.png", "question": "How many?"}) + "\n")
    (out / "pre.jsonl").write_text(
        "".join(
            json.dumps({"id": r["id"], "path": r["path"], "texts": {"caption": r["captions"][0]}})
            + "\n"
            for r in lines(out / "caption.jsonl")
        )
    )
    assert cli.run([str(a) for a in (
        "-q", "pretrain", out / "pre.jsonl", "-o", root / "run", "--vision",
        "vit_tiny_patch16_224", "--image-size", "32", "--text", tiny_bert(), "--max-tokens",
        "40", "--embed-dim", "32", "--queue-size", "16", "--batch-size", "8", "--max-steps",
        "1", "--warmup-steps", "1", "--workers", "0", "--fields", "caption",
    )]) == 0  # fmt: skip
    return out, root / "run"


def test_build_summary_says_what_was_not_made(capsys, tmp_path):
    hrsid = shared("hrsid_mini")
    _, err = run(capsys, "finetune", "build", "--from", hrsid / "masks", "--images",
                 hrsid / "images", "--classes", "0,255,0=ship", "--objects", "ship",
                 "--tasks", "vqa", "-o", tmp_path / "o")  # fmt: skip
    assert "not made: main_landform, all_landforms, region_landform (no landform masks" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "answers.json", "summary.json", "vqa.jsonl",
    ]  # fmt: skip
    (tmp_path / "f").write_text("x")
    _, err = run(capsys, "finetune", "build", "--from", hrsid / "masks", "--classes",
                 "0,255,0=ship", "-o", tmp_path / "f", code=2)  # fmt: skip
    assert "not a folder" in err
    _, err = run(capsys, "finetune", "build", "--from", hrsid / "masks", "--images",
                 hrsid / "images", "--classes", "0,255,0=ship", "--tasks", "captions",
                 "-o", tmp_path / "o2", code=2)  # fmt: skip
    assert "--tasks captions" in err
    test = tmp_path / "test.txt"
    test.write_text("P0001_1200_2000_9600_10400\nP0001_1800_2600_3600_4400\n")
    run(capsys, "finetune", "build", "--from", hrsid / "masks", "--images", hrsid / "images",
        "--classes", "0,255,0=ship", "--objects", "ship", "--tasks", "caption", "--test-list",
        test, "-o", tmp_path / "o3")  # fmt: skip
    held = [r["id"] for r in lines(tmp_path / "o3" / "caption.jsonl") if r["split"] == "test"]
    assert sorted(held) == test.read_text().split()


def test_retrieval_from_a_run(sft, capsys, tmp_path):
    data, pre = sft
    ret = tmp_path / "ret"
    run(capsys, "finetune", "retrieval", "--init", pre, "--data", data / "retrieval.jsonl",
        "-o", ret, *TINY, "--k-test", "4", "--alpha", "0.3", "--momentum", "0.9",
        "--max-tokens", "35")  # fmt: skip
    config = json.loads((ret / "config.json").read_text())
    assert config["task"] == "retrieval" and config["init"]["kind"] == "run"
    assert (ret / "text" / "tokenizer.json").exists() and (ret / "best.safetensors").exists()
    split = json.loads((ret / "split.json").read_text())
    assert split["how"] == "given" and len(split["val"]) == 7
    # k 0 ranks by ITC alone: the re-ranked figures are then the ITC ones
    out, _ = run(capsys, "eval", "retrieval", ret, "--k-test", "0", "--weights", "best",
                 "--max-tokens", "30")  # fmt: skip
    m = json.loads(out)["metrics"]
    assert m["r_mean"] == pytest.approx(m["itc_r_mean"])
    assert m["images"] == 7 and m["texts"] == 35
    for k in (1, 5, 10):
        assert 0 <= m[f"i2t_r{k}"] <= 100 and 0 <= m[f"t2i_r{k}"] <= 100
    assert m["i2t_r1"] <= m["i2t_r5"] <= m["i2t_r10"]
    out, _ = run(capsys, "eval", "--compare", ret)  # the Table 6 layout: one row per init
    table = json.loads(out)
    assert table[pre.name]["retrieval:r_mean"] == pytest.approx(m["r_mean"])


def test_caption_from_random_init(sft, capsys, tmp_path):
    data, _ = sft
    cap = tmp_path / "cap"
    run(capsys, "finetune", "caption", "--init", "random", "--vision", "vit_tiny_patch16_224",
        "--image-size", "32", "--text", tiny_bert(), "--text-layers", "1", "--data",
        data / "caption.jsonl", "-o", cap, *TINY, "--prompt", "a SAR image of", "--beams", "1",
        "--max-new-tokens", "4", "--max-tokens", "40")  # fmt: skip
    config = json.loads((cap / "config.json").read_text())
    assert config["model"]["text_layers"] == 1 and config["init"]["kind"] == "random"
    out, err = run(capsys, "eval", "caption", cap, "--no-meteor", "--beams", "2",
                   "--max-new-tokens", "5", "--max-tokens", "40", "--data",
                   data / "caption.jsonl")  # fmt: skip
    record = json.loads(out)
    m = record["metrics"]
    assert {"bleu4", "rouge_l", "cider"} <= set(m) and "meteor" not in m
    assert "spice" not in m and "spice  unavailable" in err  # never reported as 0
    samples = lines(cap / "eval" / "captions.jsonl")
    assert len(samples) == 7 and all(s["caption"].startswith("a SAR image of") for s in samples)
    _, err = run(capsys, "eval", "caption", cap, "--no-meteor", "--spice-jars", tmp_path, code=1)
    assert "spice-1.0.jar" in err


def test_vqa_from_a_run(sft, capsys, tmp_path):
    data, pre = sft
    vqa = tmp_path / "vqa"
    _, err = run(capsys, "finetune", "vqa", "--init", pre, "--data", data / "vqa.jsonl", "-o",
                 vqa, *TINY, "--answer-mode", "rank", "--max-tokens", "48")  # fmt: skip
    assert "skipped 1 record(s) (question without an answer" in err and "bad/q0" in err
    out, _ = run(capsys, "eval", "vqa", vqa, "--answer-mode", "generate", "--max-tokens", "40")
    m = json.loads(out)["metrics"]
    assert {"acc_count", "acc_recognition", "acc_position", "acc_overall"} <= set(m)
    answers = lines(vqa / "eval" / "vqa_answers.jsonl")
    assert len(answers) == m["questions"] and all("prediction" in a for a in answers)
    # the run's mode (rank) by default: answers come from the vocabulary of the question's type
    out, _ = run(capsys, "eval", "vqa", vqa)
    by_type = json.loads((data / "answers.json").read_text())["by_type"]
    ranked = lines(vqa / "eval" / "vqa_answers.jsonl")
    assert all(a["prediction"] in by_type[a["type"]] for a in ranked)  # of the question's type
    assert json.loads(out)["metrics"]["outside_vocabulary"] == 0


def test_eval_text_plot(sft, capsys, tmp_path):
    data, pre = sft
    png = tmp_path / "tsne.png"
    out, err = run(capsys, "eval", "text", data / "caption.jsonl", "--plot", png, "--run", pre,
                   "--limit", "20")  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "t-SNE of 40 features" in err
    stats = json.loads(out)["caption.jsonl"]["caption"]
    assert stats["texts"] == 180  # 36 images x 5 templates


def _csv(path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_retrieval_under_torchrun_two_ranks(sft, capsys, tmp_path):
    """`torchrun --nproc_per_node 2 -m sarkit finetune retrieval` trains (DDP, gloo): finite
    losses, a complete run folder written once, the held-out split ranked whole (7 images,
    35 texts, as `sarkit eval retrieval` finds on the run), and its first step's ITC loss
    equals a one-process run's at twice the batch: every rank's batch is in the ITC
    negatives. Without that gather the step-1 ITC of 2 x 4 would be a softmax over 4
    candidates, not 8 (about ln 2 nats lower).

    The text towers have no dropout here (a copy of the tiny BERT with dropout 0): dropout
    draws differ between the runs and would move the ITC loss by far more than the
    reduction-order noise (~1e-6 relative) that the tolerance allows. ITM is not compared:
    its hard negatives are random draws, over 8 samples in either case but from differently
    seeded streams; it is checked finite only."""
    import shutil

    data, _ = sft
    bert = tmp_path / "bert"
    shutil.copytree(tiny_bert(), bert)
    config = json.loads((bert / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (bert / "config.json").write_text(json.dumps(config))
    pre = tmp_path / "pre"
    run(capsys, "-q", "pretrain", data / "pre.jsonl", "-o", pre, "--vision",
        "vit_tiny_patch16_224", "--image-size", "32", "--text", bert, "--max-tokens", "40",
        "--embed-dim", "32", "--queue-size", "16", "--batch-size", "8", "--max-steps", "1",
        "--warmup-steps", "1", "--workers", "0", "--fields", "caption")  # fmt: skip
    common = ["finetune", "retrieval", "--init", pre, "--data", data / "retrieval.jsonl",
              "--max-steps", "2", "--workers", "0", "--log-every", "1", "--k-test", "4",
              "--max-tokens", "35", "--lr", "1e-4"]  # fmt: skip
    run(capsys, *common, "--batch-size", "8", "-o", tmp_path / "one")
    two = tmp_path / "two"
    proc = torchrun(*common, "--batch-size", "4", "-o", two,
                    env={"TMPDIR": str(tmp_path), "DS_ACCELERATOR": "cpu"})  # fmt: skip
    assert proc.stderr.count("fine-tuned retrieval ->") == 1  # status lines from rank 0 only

    rows2, rows1 = _csv(two / "metrics.csv"), _csv(tmp_path / "one" / "metrics.csv")
    assert [r["step"] for r in rows2] == ["1", "2"]
    for r in rows2:
        for key in ("loss", "itc", "itm"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (key, r)
    a, b = float(rows1[0]["itc"]), float(rows2[0]["itc"])
    assert abs(a - b) <= 1e-5 * abs(a) + 2e-6, (a, b)
    assert rows1[0]["temp"] == rows2[0]["temp"]

    names = {p.name for p in two.iterdir()}
    assert {"config.json", "split.json", "text", "best.safetensors", "best.json",
            "last.safetensors", "metrics.csv", "eval.csv", "results.json",
            "checkpoints"} <= names  # fmt: skip
    assert not [n for n in names if n.endswith(".part")]  # no write left half-done
    ckpt = two / "checkpoints" / (two / "checkpoints" / "latest").read_text().strip()
    assert json.loads((ckpt / "state.json").read_text())["world"] == 2
    assert {p.name for p in ckpt.glob("rng-rank*")} == {"rng-rank0.safetensors",
                                                       "rng-rank1.safetensors"}  # fmt: skip
    assert len(_csv(two / "eval.csv")) == 1  # rank 0 alone writes the evaluation rows
    measured = {k: float(v) for k, v in _csv(two / "eval.csv")[-1].items()}
    assert measured["images"] == 7 and measured["texts"] == 35  # the whole split, once
    out, _ = run(capsys, "eval", "retrieval", two, "--weights", "last")
    m = json.loads(out)["metrics"]
    assert m["images"] == 7 and m["texts"] == 35
    for key in ("i2t_r1", "t2i_r1", "r_mean", "itc_r_mean"):
        assert m[key] == pytest.approx(measured[key], abs=1e-5), key
