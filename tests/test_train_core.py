"""The training core: schedule, temperature, skipped records, bad tiles, run folders, --init,
and the shared loop on a plain model (gradient accumulation, resume)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from conftest import shared
from test_pretrain import TINY, rows
from test_pretrain_data import mstar_records, write_jsonl

# ---------------------------------------------------------------- schedule


def test_lr_decays_from_the_end_of_warmup_without_a_cliff():
    from sarkit.train.schedule import Schedule

    # the paper's setting: 3000 warm-up steps from 1e-6, x0.9 per epoch; 391 steps an epoch
    s = Schedule(peak=3e-4, start=1e-6, warmup_steps=3000, decay=0.9, steps_per_epoch=391)
    assert s.at(0) == pytest.approx(1e-6)
    assert s.at(1500) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert s.at(2999) == pytest.approx(3e-4, rel=1e-3)
    # the first epoch after warm-up runs at the peak (was 3e-4 * 0.9**7 = 1.4e-4 at 3000)
    assert s.at(3000) == pytest.approx(3e-4)
    assert s.at(3000 + 390) == pytest.approx(3e-4)
    assert s.at(3000 + 391) == pytest.approx(2.7e-4)
    assert s.at(3000 + 2 * 391) == pytest.approx(2.43e-4)
    assert s.at(10**7) == pytest.approx(1e-6)  # the floor
    rates = [s.at(i) for i in range(0, 3000 + 391 * 40)]
    assert all(b <= a * 1.0001 for a, b in zip(rates[3000:], rates[3001:], strict=False))
    jumps = [abs(b - a) / a for a, b in zip(rates[3000:], rates[3001:], strict=False)]
    assert max(jumps) == pytest.approx(0.1, abs=1e-6)  # never more than one x0.9 at a time


def test_other_schedule_kinds():
    from sarkit.train.schedule import Schedule

    cos = Schedule(
        peak=1.0, start=0.0, warmup_steps=10, minimum=0.0, kind="cosine", total_steps=110
    )
    assert cos.at(10) == pytest.approx(1.0) and cos.at(60) == pytest.approx(0.5)
    assert cos.at(110) == pytest.approx(0.0, abs=1e-12)
    ms = Schedule(peak=1.0, warmup_steps=0, minimum=0.0, kind="multistep", total_steps=100,
                  decay=0.1, milestones=(0.5, 0.8))  # fmt: skip
    assert [ms.at(i) for i in (49, 50, 80)] == pytest.approx([1.0, 0.1, 0.01])
    poly = Schedule(peak=1.0, warmup_steps=0, minimum=0.0, kind="poly", total_steps=100, power=1.0)
    assert poly.at(25) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule(kind="linear")


# ---------------------------------------------------------------- temperature


def tiny_model():
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig

    torch.manual_seed(0)
    config = KnowLIPConfig(
        vision="vit_tiny_patch16_224", image_size=32, text_layers=1, max_tokens=40,
        embed_dim=32, queue_size=8, vision_args={"depth": 1},
    )  # fmt: skip
    return KnowLIP(config)


def test_temperature_is_clamped_in_place_and_keeps_its_gradient():
    from sarkit.model.knowlip import TEMP_RANGE, Momentum
    from sarkit.model.text import TextCodec

    model = tiny_model()
    codec = TextCodec.from_pretrained(None, model.config.fields, 40)
    enc = codec.encode([{"Terrain": "flat ground"}, {"Terrain": "a river by a town"}])
    momentum = Momentum(model, 8, 0.9)
    with torch.no_grad():
        model.temp.fill_(0.9)  # out of range, as an lr spike can leave it
    out = model(torch.randn(2, 1, 32, 32), enc.input_ids, enc.attention_mask, momentum, 0.0)
    out["itc"].backward()
    assert float(model.temp.detach()) == pytest.approx(TEMP_RANGE[1])  # the parameter itself moved
    assert float(out["temp"]) == pytest.approx(TEMP_RANGE[1])
    # a clamped copy would leave the parameter at 0.9 with a zero gradient, stuck there
    assert model.temp.grad is not None and float(model.temp.grad.abs()) > 0


# ---------------------------------------------------------------- records pretrain skips


@pytest.fixture(scope="module")
def mstar20(tmp_path_factory):
    return mstar_records(shared("mstar"), "train", 2)


def test_failed_empty_and_dropped_records_are_skipped_and_counted(mstar20, tmp_path, cli):
    recs = [dict(r) for r in mstar20[:12]]
    recs[0] = {k: v for k, v in recs[0].items() if k != "texts"}
    recs[0]["caption"] = {"failed": "the answer missed Terrain"}
    recs[1]["texts"] = {}
    recs[2]["quality"] = {"keep": False, "reason": "constant"}
    recs[3]["texts"] = {field: 123 for field in recs[3]["texts"]}  # numbers are no captions
    path = write_jsonl(tmp_path / "r.jsonl", recs)
    with open(path, "a") as fh:
        fh.write('{"id": "cut off\n')  # a damaged line costs only itself
    proc = cli("pretrain", path, "-o", tmp_path / "run", *TINY, "--max-steps", "2",
               "--save-every", "0", check=0)  # fmt: skip
    assert "r.jsonl:13: not valid JSON" in proc.stderr
    assert ("skipped: 1 damaged line(s), 1 failed caption(s), 2 without texts, 1 dropped by "
            "filter") in proc.stderr  # fmt: skip
    assert "training on 8 records" in proc.stderr
    assert len(rows(tmp_path / "run")) == 2
    # --strict stops before any training, naming the first such record
    proc = cli("pretrain", path, "-o", tmp_path / "strict", *TINY, "--strict", check=1)
    assert "--strict" in proc.stderr and recs[0]["id"] in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "strict").exists()
    # no usable text at all is an error before training, never a run on empty captions
    empty = write_jsonl(tmp_path / "e.jsonl", [dict(r, texts={}) for r in mstar20[:4]])
    proc = cli("pretrain", empty, "-o", tmp_path / "empty", *TINY, check=1)
    assert "no record with usable texts" in proc.stderr and "4 without texts" in proc.stderr


def test_unreadable_tiles_mid_run_are_named_and_skipped(mstar20, tmp_path, cli):
    recs = [dict(r) for r in mstar20[:12]]
    (tmp_path / "zero.jpeg").write_bytes(b"")
    good = (shared("mstar") / "train").rglob("*.jpeg").__next__().read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(good[: len(good) // 3])
    recs[3]["path"] = str(tmp_path / "zero.jpeg")
    recs[7]["path"] = str(tmp_path / "cut.jpeg")
    path = write_jsonl(tmp_path / "r.jsonl", recs)
    proc = cli("pretrain", path, "-o", tmp_path / "run", *TINY, "--workers", "0", "--epochs", "1",
               "--save-every", "0", check=0)  # fmt: skip
    assert "zero.jpeg" in proc.stderr and recs[3]["id"] in proc.stderr
    assert "cut.jpeg" in proc.stderr and "Traceback" not in proc.stderr
    assert len(rows(tmp_path / "run")) == 3  # 12 records / batch 4: every step ran


def test_damaged_checkpoint_names_the_file(mstar20, tmp_path, cli):
    path = write_jsonl(tmp_path / "r.jsonl", mstar20[:8])
    run = tmp_path / "run"
    cli("pretrain", path, "-o", run, *TINY, "--max-steps", "2", "--save-every", "1", check=0)
    victim = run / "checkpoints" / "step-00000002" / "model.safetensors"
    victim.write_bytes(b"")
    proc = cli("pretrain", path, "-o", run, *TINY, "--max-steps", "3", "--resume", "latest",
               check=1)  # fmt: skip
    assert str(victim) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()[-1]) < 300


def test_unwritable_run_folder_is_named_before_any_work(mstar20, tmp_path, cli):
    path = write_jsonl(tmp_path / "r.jsonl", mstar20[:4])
    (tmp_path / "file").write_text("x")
    proc = cli("pretrain", path, "-o", tmp_path / "file" / "run", *TINY, check=1)
    assert "file" in proc.stderr and "not a folder" in proc.stderr


def test_text_model_typos_are_named_not_sent_to_the_hub(mstar20, tmp_path, cli):
    path = write_jsonl(tmp_path / "r.jsonl", mstar20[:4])
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for text, why in [
        (tmp_path / "nothere", "no such folder"),
        (tmp_path / "empty", "no config.json"),
        (tmp_path / "file", "is a file"),
    ]:
        args = [*TINY[: TINY.index("--text")], "--text", text]
        proc = cli("pretrain", path, "-o", tmp_path / "run", *args, check=1)
        assert f"text model {text}: {why}" in proc.stderr and "internal error" not in proc.stderr


def test_deepspeed_output_stays_off_stdout(mstar20, tmp_path, cli):
    pytest.importorskip("deepspeed")
    path = write_jsonl(tmp_path / "r.jsonl", mstar20[:4])
    (tmp_path / "ds.json").write_text('{"train_batch_size": ')
    proc = cli("pretrain", path, "-o", tmp_path / "run", *TINY, "--deepspeed",
               tmp_path / "ds.json", check=1)  # fmt: skip
    assert "ds.json: not valid JSON" in proc.stderr
    assert proc.stdout == ""  # DeepSpeed logs its accelerator line at import, to stdout


# ---------------------------------------------------------------- run folder and --init


def test_a_finished_run_is_never_trained_over(run, cli):
    folder, records = run
    before = (folder / "model.safetensors").read_bytes()
    proc = cli("pretrain", records, "-o", folder, *TINY, "--max-steps", "1", check=2)
    assert "already holds a run" in proc.stderr and "--resume latest" in proc.stderr
    assert (folder / "model.safetensors").read_bytes() == before


@pytest.fixture(scope="module")
def run(mstar20, tmp_path_factory):
    from conftest import sarkit

    tmp = tmp_path_factory.mktemp("run")
    path = write_jsonl(tmp / "r.jsonl", mstar20[:12])
    sarkit("pretrain", path, "-o", tmp / "run", *TINY, "--max-steps", "3", "--save-every", "2",
           "--center-crop", "0.75", "--pool", "cls", check=0)  # fmt: skip
    return tmp / "run", path


def test_run_folder_loads_by_itself_elsewhere(run, tmp_path):
    import timm
    from safetensors.torch import load_file

    from sarkit.model.knowlip import KnowLIP

    src, _ = run
    moved = tmp_path / "elsewhere"
    shutil.copytree(src, moved)
    config = json.loads((moved / "model.json").read_text())
    config["text"] = "/nowhere/on/this/machine/bert"  # the original text model is gone
    (moved / "model.json").write_text(json.dumps(config))
    a, b = KnowLIP.from_run(src).eval(), KnowLIP.from_run(moved).eval()
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    meta = json.loads((moved / "export" / "vision.json").read_text())
    assert meta["mean"] == [config["image_mean"]] and meta["std"] == [config["image_std"]]
    assert meta["center_crop"] == 0.75 and meta["global_pool"] == "token"
    vit = timm.create_model(meta["timm_name"], in_chans=meta["in_chans"], num_classes=0,
                            img_size=meta["img_size"], global_pool=meta["global_pool"])  # fmt: skip
    vit.load_state_dict(load_file(str(moved / "export" / "vision.safetensors")))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit.eval()(x), a.image_tokens(x)[:, 0], atol=1e-5)


def test_init_takes_weights_momentum_and_queue(run):
    from safetensors.torch import load_file

    from sarkit.model.knowlip import KnowLIP
    from sarkit.train.options import PretrainOptions
    from sarkit.train.pretrain import build

    src, path = run
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    for init in (src, src / "checkpoints" / "step-00000002"):
        opts = PretrainOptions(output=src.parent / "new", records_path=str(path), init=str(init),
                               vision="vit_small_patch16_224")  # fmt: skip
        task, dataset, _ = build(recs, opts)
        assert task.model.config.vision == "vit_tiny_patch16_224"  # the init's architecture
        assert dataset.center_crop == 0.75 and task.model.config.pool == "cls"
        if init == src:
            want = KnowLIP.from_run(src).state_dict()
            momentum = load_file(str(src / "momentum.safetensors"))
        else:
            want = load_file(str(init / "model.safetensors"))
            momentum = load_file(str(init / "task.safetensors"))
        got = task.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
        m = task.momentum.state_dict()
        assert int(m["queue_filled"]) == int(momentum["queue_filled"]) > 0
        assert all(torch.equal(m[k], momentum[k]) for k in momentum)


def test_init_trains_a_new_schedule(run, tmp_path, cli):
    src, path = run
    proc = cli("pretrain", path, "-o", tmp_path / "next", *TINY, "--init", src,
               "--max-steps", "2", "--save-every", "0", check=0)  # fmt: skip
    assert "initialised from" in proc.stderr
    got = rows(tmp_path / "next")
    assert [r["step"] for r in got] == ["1", "2"] and float(got[0]["lr"]) == pytest.approx(1e-6)
    proc = cli("pretrain", path, "-o", tmp_path / "bad", *TINY, "--init", tmp_path, check=1)
    assert "--init" in proc.stderr and "model.json" in proc.stderr


# ---------------------------------------------------------------- the shared loop, plain model


class Linear(torch.nn.Module):
    """A plain model as a task head would be: forward returns the loss and a scalar."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x, y):
        logits = self.fc(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, y),
                "acc": (logits.argmax(1) == y).float().mean()}  # fmt: skip


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def fit_linear(out, **kw):
    from sarkit.train.loop import Loop
    from sarkit.train.options import LoopOptions
    from sarkit.train.task import ModuleTask

    model = Linear()
    kw = {"save_every": 0, **kw}
    opts = LoopOptions(output=out, workers=0, log_every=1, lr=0.05, warmup_steps=0,
                       weight_decay=0.0, **kw)  # fmt: skip
    Loop(ModuleTask(model), Pairs(), None, opts).fit()
    return model


def test_gradient_accumulation_counts_optimiser_steps(tmp_path):
    whole = fit_linear(tmp_path / "a", batch_size=8, epochs=2)
    accum = fit_linear(tmp_path / "b", batch_size=4, grad_accum=2, epochs=2)
    # 2 micro-batches of 4 make the same step as one batch of 8 (mean losses, same order)
    for p, q in zip(whole.parameters(), accum.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-5)
    assert (tmp_path / "b" / "model.safetensors").exists()


def test_plain_loop_resumes_exactly_with_accumulation(tmp_path):
    full = fit_linear(tmp_path / "full", batch_size=4, grad_accum=2, epochs=2, save_every=2)
    fit_linear(tmp_path / "split", batch_size=4, grad_accum=2, epochs=2, save_every=2, max_steps=4)
    resumed = fit_linear(tmp_path / "split", batch_size=4, grad_accum=2, epochs=2, save_every=2,
                         resume="latest")  # fmt: skip
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [r["loss"] for r in rows(tmp_path / "full")] == [
        r["loss"] for r in rows(tmp_path / "split")
    ]


def test_streaming_weights_file_reads_back_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    from sarkit.model.weights import write_safetensors

    tensors = {
        "a.weight": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c.half": torch.randn(4, 2).to(torch.bfloat16),
        "d.scalar": torch.tensor(2.5),
        "e.empty": torch.zeros(0, 3),
    }
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    path = tmp_path / "w.safetensors"
    write_safetensors(path, specs, iter(tensors.items()))
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with pytest.raises(ValueError, match="order"):
        write_safetensors(path, specs, reversed(list(tensors.items())))
    with pytest.raises(ValueError, match="never came"):
        write_safetensors(path, specs, iter(list(tensors.items())[:2]))


@pytest.mark.parametrize(
    "option",
    [("--lr", "nan"), ("--lr", "0"), ("--warmup-steps", "-1"), ("--center-crop", "0"),
     ("--momentum", "2"), ("--alpha", "inf"), ("--image-size", "0"), ("--grad-accum", "0")],
)  # fmt: skip
def test_numeric_options_are_checked_at_parse_time(option, tmp_path, cli):
    proc = cli("pretrain", tmp_path / "none.jsonl", "-o", tmp_path / "run", *option, check=2)
    assert option[0] in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- held-out evaluation


def test_recall_at_k_matches_brute_force():
    from sarkit.train.heldout import recall_at_k

    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(30, 40, generator=gen)
    queries = torch.randint(0, 6, (30,), generator=gen)
    items = torch.randint(0, 6, (40,), generator=gen)
    got = recall_at_k(sim, queries, items, (1, 5, 10))
    for k in (1, 5, 10):
        hits = 0
        for q in range(30):
            order = sorted(range(40), key=lambda j: -float(sim[q, j]))
            hits += any(int(items[j]) == int(queries[q]) for j in order[:k])
        assert got[k] == pytest.approx(hits / 30)


def test_held_out_retrieval_is_logged_each_epoch_and_at_the_end(mstar20, tmp_path, cli):
    train = write_jsonl(tmp_path / "r.jsonl", mstar20[:8])
    held = [dict(r) for r in mstar_records(shared("mstar"), "val", 1)]
    held[0]["path"] = str(tmp_path / "missing.jpeg")
    val = write_jsonl(tmp_path / "val.jsonl", held)
    # 8 records / batch 4: an epoch ends at step 2; --max-steps 3 stops mid-epoch 2
    proc = cli("pretrain", train, "-o", tmp_path / "run", *TINY, "--epochs", "2", "--val", val,
               "--max-steps", "3", "--save-every", "0", check=0)  # fmt: skip
    assert "missing.jpeg" in proc.stderr  # named, and left out of the held-out set
    with open(tmp_path / "run" / "eval.csv") as f:
        evals = list(csv.DictReader(f))
    assert [int(r["step"]) for r in evals] == [2, 3]  # each epoch, and the final model
    for row in evals:
        r = [float(row[f"val_i2t_r{k}"]) for k in (1, 5, 10)]
        assert 0.0 <= r[0] <= r[1] <= r[2] == 1.0  # 9 held-out records: all in the top 10
    proc = cli("pretrain", train, "-o", tmp_path / "x", *TINY, "--val", tmp_path / "no.jsonl",
               check=1)  # fmt: skip
    assert "--val" in proc.stderr and "no.jsonl" in proc.stderr
