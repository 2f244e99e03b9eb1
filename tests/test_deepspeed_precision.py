"""Every DeepSpeed preset trains in fp32 and bf16 (and fp16 where the accelerator has it).

One process on the CPU (gloo), the tiny model on real MSTAR chips, one optimiser step (of
two accumulated micro-batches under zero2; bf16 backward is slow on this CPU, 7 s a
micro-batch, and the suite has a time budget): every logged loss finite, the run exported
as fp32 safetensors that ``KnowLIP.from_run`` loads. Under bf16/fp16 DeepSpeed hands the
model half-precision images while KnowLIP's momentum towers stay fp32 (they autocast), and
the temperature's fp32 master copy is clamped through DeepSpeed's fragment API each step;
these runs crashed at step 1 before ("Input type (c10::BFloat16) and bias type (float)").
"""

from __future__ import annotations

import math

import pytest
from conftest import shared
from test_pretrain import TINY, rows
from test_pretrain_data import mstar_records, write_jsonl

pytest.importorskip("deepspeed")

PRESETS = ("zero1", "zero2", "zero3", "zero2-offload", "zero3-offload")
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}


def fp16_supported() -> bool:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "r.jsonl"
    return write_jsonl(path, mstar_records(shared("mstar"), "train", 2)[:16])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_in_precision(preset, precision, records, tmp_path, cli):
    if precision == "fp16" and not fp16_supported():
        proc = cli("pretrain", records, "-o", tmp_path / "run", *TINY, "--deepspeed", preset,
                   "--precision", "fp16", env=ENV, check=2)  # fmt: skip
        assert "fp16" in proc.stderr and "Traceback" not in proc.stderr
        pytest.skip("DeepSpeed's CPU accelerator has no fp16 on this machine (checked: the "
                    "command says so in one line and exits 2)")  # fmt: skip
    from safetensors import safe_open

    from sarkit.model.knowlip import KnowLIP

    run = tmp_path / "run"
    accum = "2" if preset == "zero2" else "1"  # DeepSpeed's own accumulation, once per precision
    cli("pretrain", records, "-o", run, *TINY, "--workers", "0", "--deepspeed", preset,
        "--precision", precision, "--max-steps", "1", "--grad-accum", accum, "--save-every", "0",
        env=ENV, check=0)  # fmt: skip
    got = rows(run)
    assert [r["step"] for r in got] == ["1"]
    for row in got:
        for key in ("loss", "itc", "itm", "mlm", "lm"):
            assert math.isfinite(float(row[key])), (preset, precision, row)
    assert 0.001 <= float(got[-1]["temp"]) <= 0.5
    with safe_open(str(run / "model.safetensors"), "pt") as fh:
        assert {str(fh.get_slice(k).get_dtype()) for k in fh.keys()} <= {"F32", "I64"}
    model = KnowLIP.from_run(run)
    assert model.config.vision == "vit_tiny_patch16_224"
