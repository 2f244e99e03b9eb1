"""The ITC temperature's fp32 master is clamped by every rank where it holds it.

KnowLIP clamps its temperature in place (ALBEF/BLIP), and under DeepSpeed the engine clamps
the optimiser's fp32 master too, before every step. That used to gather the whole master,
compare it on the host and scatter it back: a collective and a host sync per step, and
under ZeRO-3 on 2 processes a crash the first time the master left its range (DeepSpeed's
safe_set_full_fp32_param cannot set a 1-element parameter from the rank that holds only
padding). Two processes, every preset: the master pushed to 5 and to -3 comes back as 0.5
and 0.001, one inside the range stays, no collective and no host read of a tensor run
during the clamp, and after a step the module's copy equals its master.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

PRESETS = ("zero1", "zero2", "zero3", "zero2-offload", "zero3-offload")


def test_every_preset_clamps_the_master_without_a_collective(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("clamp_check.py")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), str(script), ",".join(PRESETS), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lo = float(torch.tensor(0.001))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(got) == sorted(PRESETS)
        for preset, rows in got.items():
            *clamps, (_, master, module) = rows
            assert [(v, m) for v, m, _ in clamps] == [
                (5.0, 0.5),
                (-3.0, lo),
                (0.2, pytest.approx(0.2)),
            ]
            assert all(seen == [] for _, _, seen in clamps), (preset, rank, clamps)
            assert master == module, (preset, rank)
