"""`sarkit pretrain` end to end on real MSTAR chips: run folder, export, exact resume, errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import shared, tiny_bert
from test_pretrain_data import mstar_records, write_jsonl

TINY = [
    "--vision", "vit_tiny_patch16_224", "--image-size", "32", "--text-layers", "1",
    "--max-tokens", "40", "--embed-dim", "32", "--queue-size", "20", "--batch-size", "4",
    "--warmup-steps", "3", "--lr", "1e-3", "--log-every", "1", "--workers", "1",
    "--text", str(tiny_bert()),
]  # fmt: skip


def rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("recs") / "mstar.jsonl"
    # 15 records: batches of 4, 4, 4 and a last partial batch of 3 in each epoch
    return write_jsonl(path, mstar_records(shared("mstar"), "train", 2)[:15])


def test_resume_continues_exactly_and_exports(records, tmp_path, cli):
    full, split = tmp_path / "full", tmp_path / "split"
    cli("pretrain", records, "-o", full, *TINY, "--epochs", "2", "--save-every", "3", check=0)
    # the same run stopped after 6 steps (mid second epoch), then resumed to the end
    cli("pretrain", records, "-o", split, *TINY, "--epochs", "2", "--save-every", "3",
        "--max-steps", "6", check=0)  # fmt: skip
    assert (
        json.loads((split / "checkpoints" / "step-00000006" / "state.json").read_text())[
            "batch_in_epoch"
        ]
        == 2
    )
    proc = cli("pretrain", records, "-o", split, *TINY, "--epochs", "2", "--save-every", "3",
               "--resume", "latest", check=0)  # fmt: skip
    assert "resumed from" in proc.stderr
    a, b = rows(full), rows(split)
    assert [r["step"] for r in a] == [str(i) for i in range(1, 9)]
    for key in ("loss", "itc", "itm", "mlm", "lr", "alpha", "temp"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    # checkpoints are complete folders; old ones pruned; no partial leftovers
    names = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert names == ["latest", "step-00000006", "step-00000008"]
    assert list((full / "tb").glob("events.out.tfevents.*"))

    # exports load with plain timm / transformers and reproduce the model's towers
    import timm
    from safetensors.torch import load_file
    from transformers import BertModel

    from sarkit.model.knowlip import KnowLIP
    from sarkit.model.text import TextCodec, bert_hidden

    model = KnowLIP.from_run(full).eval()
    meta = json.loads((full / "export" / "vision.json").read_text())
    vit = timm.create_model(meta["timm_name"], pretrained=False, in_chans=1, num_classes=0,
                            img_size=meta["img_size"], global_pool="")  # fmt: skip
    vit.load_state_dict(load_file(str(full / "export" / "vision.safetensors")), strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit.eval()(x), model.image_tokens(x), atol=1e-5)
    bert = BertModel.from_pretrained(str(full / "export" / "text")).eval()
    codec = TextCodec.from_pretrained(str(full / "export" / "text"), model.config.fields, 40)
    enc = codec.encode([{"Terrain": "a T72 tank on flat ground", "Roads": "no roads"}])
    with torch.no_grad():
        plain = bert(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        ours = bert_hidden(model.text, enc.input_ids, enc.attention_mask)
    assert torch.allclose(plain.last_hidden_state, ours, atol=1e-5)


def test_itm_segment_negatives_and_cross_attention_lr(records, tmp_path, cli):
    """Both options train (tests/test_scio_model.py checks what the negatives are) and the
    share is kept in model.json, so scio --init trains on with it; --cross-attention-lr-scale
    gives the cross-attention layers (and only them) groups of their own."""
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig
    from sarkit.train.engine import param_groups
    from sarkit.train.pretrain import cross_attention_groups

    run = tmp_path / "swap"
    cli("pretrain", records, "-o", run, *TINY, "--max-steps", "1", "--save-every", "0",
        "--itm-segment-negatives", "1", "--cross-attention-lr-scale", "1", check=0)  # fmt: skip
    assert torch.isfinite(torch.tensor(float(rows(run)[0]["itm"])))
    assert json.loads((run / "model.json").read_text())["itm_segment_negatives"] == 1.0
    proc = cli("pretrain", records, "-o", tmp_path / "bad", "--itm-segment-negatives", "2",
               check=2)  # fmt: skip
    assert "2" in proc.stderr and "Traceback" not in proc.stderr

    model = KnowLIP(KnowLIPConfig(vision="tiny", image_size=32, text=str(tiny_bert())))
    groups = cross_attention_groups(model, param_groups(model, 0.05, 0.1), 0.5)
    cross = {id(p) for n, p in model.named_parameters() if ".crossattention." in n}
    assert cross
    for g in groups:
        inside = {id(p) in cross for p in g["params"]}
        assert len(inside) == 1  # a group holds cross-attention weights or none
        if inside == {True}:
            assert g["lr_scale"] == 0.5
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {g["lr_scale"] for g in groups if id(g["params"][0]) not in cross} == {0.1, 1.0}


def test_bad_input_is_one_line(tmp_path, cli):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x/1", "path": "nowhere.jpeg"}])
    proc = cli("pretrain", bad, "-o", tmp_path / "run", *TINY, check=1)
    assert "x/1" in proc.stderr and "texts" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("pretrain", bad, "-o", tmp_path / "run", "--deepspeed", "zero9", check=2)
    assert "zero9" in proc.stderr
    proc = cli("pretrain", bad, "-o", tmp_path / "run", "--precision", "fp8", check=2)
    assert "fp8" in proc.stderr


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses(records, tmp_path, cli):
    """Checkpointing recomputes each block in the backward pass with the RNG state of the
    forward (dropout alike), so the loss sequence equals the plain run's; the tolerance only
    covers a different summation order in the recomputed kernels."""
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    cli("pretrain", records, "-o", plain, *TINY, "--max-steps", "4", "--save-every", "0",
        check=0)  # fmt: skip
    cli("pretrain", records, "-o", ckpt, *TINY, "--max-steps", "4", "--save-every", "0",
        "--grad-checkpointing", check=0)  # fmt: skip
    for a, b in zip(rows(plain), rows(ckpt), strict=True):
        for key in ("loss", "itc", "itm", "mlm"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_close_to_fp32(records, tmp_path, cli, precision):
    """Autocast keeps 8 (bf16) or 11 (fp16, with a gradient scaler) significant bits, ~0.4%
    or less per rounding: the first step's losses, before the runs' weights part, agree
    within 3%; every later loss is finite."""
    fp32, half = tmp_path / "fp32", tmp_path / precision
    cli("pretrain", records, "-o", fp32, *TINY, "--max-steps", "3", "--save-every", "0",
        check=0)  # fmt: skip
    cli("pretrain", records, "-o", half, *TINY, "--max-steps", "3", "--save-every", "0",
        "--precision", precision, check=0)  # fmt: skip
    a, b = rows(fp32), rows(half)
    assert len(b) == 3
    for key in ("itc", "itm", "mlm"):
        assert float(b[0][key]) == pytest.approx(float(a[0][key]), rel=0.03), key
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in b)
