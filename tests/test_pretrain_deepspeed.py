"""DeepSpeed ZeRO-2 and ZeRO-3 on the CPU, two processes (gloo), against plain PyTorch DDP.

The three engines run the same real (tiny) model on the same MSTAR records with the same
seeds, so every rank sees the same samples and draws the same masks; only the engine
differs. In fp32 they differ only in reduction order (DDP's bucketed all-reduce vs ZeRO's
reduce-scatter over flat partitions), ~1e-7 relative. Two things amplify that over steps:
Adam's normalised update (a gradient near zero moves its weight by a full lr whatever its
sign) and the ITM hard negatives, drawn from the similarity distribution (a tiny shift can
change a draw). Measured: the first two steps agree to 1e-7; ZeRO-2 and ZeRO-3 agree with
each other to 1e-6 on every step; against DDP the drift after two real updates is ~1e-4
relative at lr 1e-4 (~1e-3 at lr 1e-3). Hence: steps 1-2 within 1e-5, later steps within
2e-3 relative of DDP, ZeRO-2 vs ZeRO-3 within 1e-4. A real fault (gradients summed instead
of averaged, a skipped reduction, a stale momentum encoder or queue, a partition not
gathered) moves the losses by percents from the third step on.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import shared, torchrun
from test_pretrain import TINY, rows
from test_pretrain_data import mstar_records, write_jsonl

from sarkit.errors import SarkitError

pytest.importorskip("deepspeed")

STEPS = 4


def run2(records, out, *extra) -> list[dict]:
    torchrun("pretrain", records, "-o", out, *TINY, "--workers", "0", "--max-steps", STEPS,
             "--save-every", "0", "--lr", "1e-4", "--warmup-steps", "1", *extra,
             env={"DS_ACCELERATOR": "cpu"}, timeout=500)  # fmt: skip
    return rows(out)


@pytest.mark.slow
def test_zero2_and_zero3_match_ddp(tmp_path):
    records = write_jsonl(tmp_path / "r.jsonl", mstar_records(shared("mstar"), "train", 2))
    ddp = run2(records, tmp_path / "ddp")
    assert len(ddp) == STEPS
    runs = {stage: run2(records, tmp_path / stage, "--deepspeed", stage)
            for stage in ("zero2", "zero3")}  # fmt: skip
    for stage, got in runs.items():
        assert [r["step"] for r in got] == [r["step"] for r in ddp]
        for a, b in zip(ddp, got, strict=True):
            rtol = 1e-5 if int(a["step"]) <= 2 else 2e-3
            for key in ("loss", "itc", "itm", "mlm", "temp"):
                x, y = float(a[key]), float(b[key])
                assert abs(x - y) <= rtol * abs(x) + 1e-6, (stage, a["step"], key, x, y)
    for a, b in zip(runs["zero2"], runs["zero3"], strict=True):
        for key in ("loss", "itc", "itm", "mlm"):
            assert abs(float(a[key]) - float(b[key])) <= 1e-4 * abs(float(a[key])), (a, b)
    # the losses moved: the comparison is between runs that train (with the tests' small
    # random text tower, a few steps at lr 1e-4 move them without a reliable direction)
    assert max(abs(float(r["loss"]) - float(ddp[0]["loss"])) for r in ddp[1:]) > 1e-3

    # ZeRO-3's gathered export is the same model DDP trained
    import torch

    from sarkit.model.knowlip import KnowLIP

    with torch.no_grad():
        a = dict(KnowLIP.from_run(tmp_path / "ddp").named_parameters())
        b = dict(KnowLIP.from_run(tmp_path / "zero3").named_parameters())
        diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
        norm = sum(float(a[k].pow(2).sum()) for k in a) ** 0.5
        biggest = max(float((a[k] - b[k]).abs().max()) for k in a)
    # measured 3e-4: the sign-flipped Adam steps of the tied vocabulary weights, whose
    # gradients are ~1e-9; a missing or doubled update would be of the order of 1e-2
    assert diff / norm < 1e-3
    # an Adam step moves a weight by about lr, so two runs cannot differ by much more
    assert biggest < 4 * 1e-4 * STEPS


def test_deepspeed_resume_continues_exactly_and_reads_safely(tmp_path, cli):
    """One-process ZeRO-2: stopped after 3 steps and resumed, the losses equal an
    uninterrupted run's; DeepSpeed's own files are read with weights_only=True, so a
    checkpoint file carrying a pickled object is refused, not run."""
    records = write_jsonl(tmp_path / "r.jsonl", mstar_records(shared("mstar"), "train", 2)[:24])
    common = [*TINY, "--workers", "0", "--deepspeed", "zero2", "--save-every", "3"]
    env = {"DS_ACCELERATOR": "cpu"}
    full, split = tmp_path / "full", tmp_path / "split"
    cli("pretrain", records, "-o", full, *common, "--max-steps", "6", env=env, check=0)
    cli("pretrain", records, "-o", split, *common, "--max-steps", "3", env=env, check=0)
    proc = cli("pretrain", records, "-o", split, *common, "--max-steps", "6",
               "--resume", "latest", env=env, check=0)  # fmt: skip
    assert "resumed from" in proc.stderr

    a, b = rows(full), rows(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    for key in ("loss", "itc", "itm", "mlm", "lr", "temp"):
        assert [r[key] for r in a] == [r[key] for r in b], key

    # a doctored DeepSpeed file: a pickle that would call a function when unpickled
    import torch

    step3 = split / "checkpoints" / "step-00000003"
    victim = next(step3.rglob("mp_rank_00_model_states.pt"))
    marker = tmp_path / "ran"
    torch.save({"module": Sneaky(str(marker))}, victim)
    proc = cli("pretrain", records, "-o", tmp_path / "again", *common, "--max-steps", "4",
               "--resume", str(step3), env=env, check=1)  # fmt: skip
    assert not marker.exists()
    assert "not read" in proc.stderr and "Traceback" not in proc.stderr


class Sneaky:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_zero3_offload_matches_plain_pytorch(tmp_path, cli):
    """ZeRO-3 with parameters and optimizer state offloaded (DeepSpeedCPUAdam, JIT-built on
    first use) against plain PyTorch's AdamW, one process: both are fp32 Adam on the same
    batches. The first step's losses (before any update) agree to rounding; after updates,
    the Adam amplification of the module docstring applies (measured 4e-4 relative on step
    3 at lr 1e-3), hence the same 2e-3 as against DDP."""
    records = write_jsonl(tmp_path / "r.jsonl", mstar_records(shared("mstar"), "train", 2)[:24])
    common = [*TINY, "--workers", "0", "--save-every", "0", "--max-steps", "3"]
    cli("pretrain", records, "-o", tmp_path / "plain", *common, check=0)
    cli("pretrain", records, "-o", tmp_path / "offload", *common, "--deepspeed", "zero3-offload",
        env={"DS_ACCELERATOR": "cpu"}, check=0)  # fmt: skip
    for run in ("plain", "offload"):
        assert (tmp_path / run / "model.safetensors").exists()
    plain, offload = rows(tmp_path / "plain"), rows(tmp_path / "offload")
    assert len(plain) == len(offload) == 3
    for a, b in zip(plain, offload, strict=True):
        rtol = 1e-5 if a["step"] == "1" else 2e-3
        for key in ("loss", "itc", "itm", "mlm"):
            assert abs(float(a[key]) - float(b[key])) <= rtol * abs(float(a[key])), (key, a, b)


def zero12_state(checkpoint) -> dict[str, torch.Tensor]:
    """Each parameter's fp32 master and Adam moments in a ZeRO-1/2 checkpoint, its pieces
    in the ranks' partitions (DeepSpeed's own slice map) laid end to end; and each group's
    step count. Read with weights_only=True."""
    from sarkit.train.engine import read_safely

    files = (checkpoint / "deepspeed").glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")
    pieces: dict[str, list[torch.Tensor]] = {}
    for path in sorted(files, key=lambda p: int(p.name.split("rank_")[1].split("_")[0])):
        o = read_safely(path)["optimizer_state_dict"]
        for g, mapping in enumerate(o["param_slice_mappings"]):
            state = o["base_optimizer_state"]["state"][g]
            pieces.setdefault(f"step/{g}", []).append(torch.as_tensor(state["step"]).reshape(1))
            flats = {"fp32": o["single_partition_of_fp32_groups"][g].detach(), **state}
            for name, at in mapping.items():
                for key in ("fp32", "exp_avg", "exp_avg_sq"):
                    part = flats[key][at.start : at.start + at.numel]
                    pieces.setdefault(f"{key}/{name}", []).append(part)
    out = {k: torch.cat(v) for k, v in pieces.items()}
    steps = [k for k in out if k.startswith("step/")]
    assert all(len(out[k].unique()) == 1 for k in steps)  # one count on every rank
    return {k: out[k][:1] if k in steps else v for k, v in out.items()}


def same_state(a: dict, b: dict) -> bool:
    return len(a) > 4 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_another_number_of_processes(tmp_path, cli):
    """A 2-process checkpoint resumes on 2 exactly, and on 1 (batch 8: the same global
    batch). ZeRO-2's partitions go through DeepSpeed's universal format: the 1-process run
    holds exactly the fp32 masters and Adam moments the 2 processes had (it saves them in
    its own folder, compared here partition by partition), and back from 1 process to 2
    the same; it then trains as a 1-process resume from DDP does (to the ZeRO-against-DDP
    noise of test_zero2_and_zero3_match_ddp). From DDP it resumes on 1 with exactly the
    weights the 2 processes had."""
    from sarkit.model.knowlip import KnowLIP

    records = write_jsonl(tmp_path / "r.jsonl", mstar_records(shared("mstar"), "train", 2)[:16])
    ds = ["--deepspeed", "zero2", "--save-every", "2"]
    full = run2(records, tmp_path / "full", *ds)
    step2 = tmp_path / "full" / "checkpoints" / "step-00000002"
    step4 = tmp_path / "full" / "checkpoints" / "step-00000004"
    again = run2(records, tmp_path / "again", *ds, "--resume", str(step2))
    assert [r["step"] for r in again] == ["3", "4"]
    for a, b in zip(full[2:], again, strict=True):
        for key in ("loss", "itc", "itm", "mlm", "temp"):
            assert a[key] == b[key], (key, a, b)

    one = [*TINY, "--workers", "0", "--lr", "1e-4", "--warmup-steps", "1", "--save-every", "2",
           "--batch-size", "8", "--max-steps", "4"]  # fmt: skip
    env = {"DS_ACCELERATOR": "cpu"}
    # 2 -> 1 at the end of the run: nothing left to train, the state saved again on 1 (a
    # conversion left by a killed run is cleared first)
    stale = tmp_path / "shrunk" / "checkpoints" / ".universal-step-00000002"
    stale.mkdir(parents=True)
    (stale / "left.pt").write_bytes(b"x")
    proc = cli("pretrain", records, "-o", tmp_path / "shrunk", *one, "--deepspeed", "zero2",
               "--resume", str(step4), env=env, check=0)  # fmt: skip
    assert "saved by 2 process(es) under ZeRO-2; converting" in proc.stderr
    assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr
    shrunk = tmp_path / "shrunk" / "checkpoints" / "step-00000004"
    assert len(list((shrunk / "deepspeed").glob("zero_pp_rank_*"))) == 1
    assert same_state(zero12_state(shrunk), zero12_state(step4))
    weights = (tmp_path / "full" / "model.safetensors").read_bytes()
    assert (tmp_path / "shrunk" / "model.safetensors").read_bytes() == weights
    assert not list((tmp_path / "shrunk" / "checkpoints").glob(".universal*"))
    # and 1 -> 2
    torchrun("pretrain", records, "-o", tmp_path / "grown", *TINY, "--workers", "0",
             "--max-steps", STEPS, "--lr", "1e-4", "--warmup-steps", "1", *ds, "--resume",
             shrunk, env=env, timeout=500)  # fmt: skip
    grown = tmp_path / "grown" / "checkpoints" / "step-00000004"
    assert len(list((grown / "deepspeed").glob("zero_pp_rank_*"))) == 2
    assert same_state(zero12_state(grown), zero12_state(step4))
    assert (tmp_path / "grown" / "model.safetensors").read_bytes() == weights

    # a damaged partition: one line naming it, no traceback, nothing loaded
    damaged = tmp_path / "damaged"
    shutil.copytree(step2, damaged)
    victim = next((damaged / "deepspeed").glob("*zero_pp_rank_1_*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:1000])
    proc = cli("pretrain", records, "-o", tmp_path / "never", *one, "--deepspeed", "zero2",
               "--resume", damaged, env=env, check=1)  # fmt: skip
    assert victim.name in proc.stderr and "Traceback" not in proc.stderr
    assert not list(damaged.parent.glob("never/checkpoints/.universal*"))

    # 2 -> 1 mid-run, against DDP's 2 -> 1 (whose state is whole, nothing to convert)
    cli("pretrain", records, "-o", tmp_path / "z1", *one, "--deepspeed", "zero2",
        "--resume", str(step2), env=env, check=0)  # fmt: skip
    run2(records, tmp_path / "ddp", "--save-every", "2")
    ddp2 = tmp_path / "ddp" / "checkpoints" / "step-00000002"
    proc = cli("pretrain", records, "-o", tmp_path / "ddp1", *one, "--resume", str(ddp2),
               check=0)  # fmt: skip
    assert "saved with 2 process(es) x batch 4, resumed with 1 x 8" in proc.stderr
    assert "goes on after its first 16 samples" in proc.stderr
    ddp1, z1 = rows(tmp_path / "ddp1"), rows(tmp_path / "z1")
    assert [r["step"] for r in ddp1] == [r["step"] for r in z1] == ["3", "4"]
    for a, b in zip(ddp1, z1, strict=True):
        for key in ("loss", "itc", "itm", "mlm"):
            assert abs(float(a[key]) - float(b[key])) <= 2e-3 * abs(float(a[key])), (key, a, b)
    ddp4 = tmp_path / "ddp" / "checkpoints" / "step-00000004"
    cli("pretrain", records, "-o", tmp_path / "end", *one, "--resume", str(ddp4), check=0)
    with torch.no_grad():
        a = dict(KnowLIP.from_run(tmp_path / "ddp").named_parameters())
        b = dict(KnowLIP.from_run(tmp_path / "end").named_parameters())
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_shards_are_cut_anew_for_another_world_size(tmp_path):
    """ZeRO-3's layout (rank r of w holds [r * s, (r + 1) * s) of the flat tensor, s =
    ceil(n / w), zero-padded): shards of 3 ranks read back as those of 2, 1 and 4."""
    from safetensors.torch import save_file

    from sarkit.train.universal import reshard

    whole = {"a": torch.arange(10.0), "b": torch.arange(7.0) + 100, "c": torch.tensor([5.0])}

    def shards(w: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for r in range(w):
            part = {}
            for k, t in whole.items():
                s = -(-t.numel() // w)
                part[k] = torch.nn.functional.pad(t, (0, s * w - t.numel()))[r * s : (r + 1) * s]
            out.append(part)
        return out

    files = []
    for r, part in enumerate(shards(3)):
        files.append(tmp_path / f"task-rank{r}.safetensors")
        save_file(part, str(files[-1]))
    numels = {k: t.numel() for k, t in whole.items()}
    for w in (2, 1, 4):
        for r, want in enumerate(shards(w)):
            got = {k: torch.full_like(v, -1.0) for k, v in want.items()}
            reshard(files, got, numels, r)
            assert all(torch.equal(got[k], want[k]) for k in want), (w, r, got, want)
    files[1].unlink()
    with pytest.raises(SarkitError, match="task-rank1.safetensors"):
        reshard(files, {"a": torch.zeros(5)}, numels, 0)


def test_the_universal_conversion_reads_no_pickled_objects(tmp_path):
    """DeepSpeed's converter and universal loader call torch.load(weights_only=False);
    under safe_torch_load a file that would run code when unpickled is refused, not run."""
    from sarkit.train.universal import safe_torch_load

    victim, marker = tmp_path / "optim_states.pt", tmp_path / "ran"
    torch.save({"state": Sneaky(str(marker))}, victim)
    stock = torch.load
    with safe_torch_load(), pytest.raises(SarkitError, match="not read"):
        torch.load(victim, weights_only=False)
    assert not marker.exists()
    torch.save({"t": torch.ones(2), "n": 3}, tmp_path / "ok.pt")
    with safe_torch_load():
        assert torch.load(tmp_path / "ok.pt", weights_only=False)["n"] == 3
    assert torch.load is stock


def test_zero3_splits_the_momentum_towers_and_resumes_them(tmp_path, cli):
    """Two processes under ZeRO-3: each rank holds half of the momentum towers (its own
    checkpoint file of shards, about half their size), the EMA moves those shards, and a
    run resumed from step 2 ends with exactly the momentum towers and losses of the
    uninterrupted run. The export gathers them whole, and they are the towers DDP's
    unsplit EMA makes from the same batches."""
    from safetensors import safe_open

    records = write_jsonl(tmp_path / "r.jsonl", mstar_records(shared("mstar"), "train", 2)[:16])
    # a fast EMA (0.5): a stale or misapplied shard update shows against DDP's towers
    ds = ["--deepspeed", "zero3", "--save-every", "2", "--momentum", "0.5"]
    full = run2(records, tmp_path / "full", *ds)
    step2 = tmp_path / "full" / "checkpoints" / "step-00000002"
    shards = [step2 / f"task-rank{r}.safetensors" for r in (0, 1)]
    with safe_open(str(tmp_path / "full" / "momentum.safetensors"), "pt") as fh:
        whole = {k: fh.get_slice(k).get_shape() for k in fh.keys()}  # noqa: SIM118
        numel = {k: math.prod(s) for k, s in whole.items()}
    split_names = set()
    per_rank = []
    for path in shards:
        with safe_open(str(path), "pt") as fh:
            names = list(fh.keys())
            split_names |= set(names)
            per_rank.append(sum(math.prod(fh.get_slice(k).get_shape()) for k in names))
    towers = sum(n for k, n in numel.items() if k in split_names)
    assert split_names and all(k in whole for k in split_names)
    assert not any("queue" in k for k in split_names)  # the queues stay whole, on rank 0
    for got in per_rank:  # half each, give or take the padding of odd-sized tensors
        assert 0.5 * towers <= got <= 0.5 * towers + len(split_names)
    with safe_open(str(step2 / "task.safetensors"), "pt") as fh:
        assert not set(fh.keys()) & split_names

    again = run2(records, tmp_path / "again", *ds, "--resume", str(step2))
    assert [r["step"] for r in again] == ["3", "4"]
    for a, b in zip(full[2:], again, strict=True):
        for key in ("loss", "itc", "itm", "mlm", "temp"):
            assert a[key] == b[key], (key, a, b)
    import torch
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "momentum.safetensors"))
    b = load_file(str(tmp_path / "again" / "momentum.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: list(v.shape) for k, v in a.items()} == {k: list(s) for k, s in whole.items()}

    # on 1 process: the optimiser state through DeepSpeed's universal format, the towers'
    # shards cut anew from both ranks' files: exactly the weights and towers of the 2
    step4 = tmp_path / "full" / "checkpoints" / "step-00000004"
    proc = cli("pretrain", records, "-o", tmp_path / "one", *TINY, "--workers", "0", "--lr",
               "1e-4", "--warmup-steps", "1", "--batch-size", "8", "--max-steps", "4", *ds,
               "--resume", step4, env={"DS_ACCELERATOR": "cpu"}, check=0)  # fmt: skip
    assert "saved by 2 process(es) under ZeRO-3; converting" in proc.stderr
    for name in ("model.safetensors", "momentum.safetensors"):
        one = load_file(str(tmp_path / "one" / name))
        two = load_file(str(tmp_path / "full" / name))
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one), name
    with safe_open(str(tmp_path / "one" / "checkpoints" / "step-00000004" /
                       "task-rank0.safetensors"), "pt") as fh:  # fmt: skip
        assert {k: math.prod(fh.get_slice(k).get_shape()) for k in fh.keys()} == {  # noqa: SIM118
            k: numel[k] for k in split_names
        }

    # the same EMA as DDP's unsplit towers, to the engines' reduction-order noise (1e-4)
    run2(records, tmp_path / "ddp", "--momentum", "0.5")
    c = load_file(str(tmp_path / "ddp" / "momentum.safetensors"))
    diff = sum(float((a[k] - c[k]).pow(2).sum()) for k in split_names) ** 0.5
    norm = sum(float(c[k].pow(2).sum()) for k in split_names) ** 0.5
    assert diff / norm < 1e-3, diff / norm
