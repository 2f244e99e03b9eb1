"""Run under torchrun by test_deepspeed_clamp.py (PRESETS FOLDER): each preset's
`clamp_parameter` against an fp32 master pushed out of range, profiled for collectives and
host reads; each rank writes FOLDER/rank<R>.json."""

from __future__ import annotations

import json
import sys
import types

import torch
from torch import nn

from sarkit.train.engine import DeepSpeedEngine, param_groups, setup_distributed


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.temp = nn.Parameter(torch.tensor([0.07]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.body(x) / self.temp).pow(2).mean()}


class Task:
    def __init__(self) -> None:
        self.model = Tiny()

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self.model, weight_decay)


WATCHED = ("allreduce", "all_reduce", "allgather", "all_gather", "broadcast", "reduce_scatter",
           "aten::equal", "aten::_local_scalar_dense")  # fmt: skip


def set_master(param: nn.Parameter, value: float) -> None:
    """The fp32 master set to `value`; under ZeRO-3 through each rank's partition, as
    DeepSpeed's safe_set_full_fp32_param fails on a rank holding only padding."""
    from deepspeed.utils import (
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    if not hasattr(param, "ds_id"):
        safe_set_full_fp32_param(param, torch.tensor([value]))
        return
    local = safe_get_local_fp32_param(param).clone()
    if torch.distributed.get_rank() * local.numel() < param.ds_numel:
        local[0] = value
    safe_set_local_fp32_param(param, local)


def main() -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    rank, world, device = setup_distributed(True)
    out = {}
    for preset in sys.argv[1].split(","):
        torch.manual_seed(0)
        opts = types.SimpleNamespace(deepspeed=preset, batch_size=2, grad_accum=1,
                                     precision="fp32", weight_decay=0.0, lr_start=1e-3)  # fmt: skip
        engine = DeepSpeedEngine(Task(), opts, device, world)
        temp = engine.module.temp
        rows = []
        for value in (5.0, -3.0, 0.2):
            set_master(temp, value)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
                engine.clamp_parameter(temp, 0.001, 0.5)
            seen = sorted({e.name for e in p.events() if any(w in e.name for w in WATCHED)})
            rows.append([value, float(safe_get_full_fp32_param(temp)), seen])
        # the module's own copy follows its master through a step
        x = torch.randn(2, 8)
        engine.micro_step({"x": x}, True)
        with engine.gathered([temp]):
            module = float(temp.detach().float())
        rows.append(["step", float(safe_get_full_fp32_param(temp)), module])
        out[preset] = rows
    with open(f"{sys.argv[2]}/rank{rank}.json", "w") as fh:
        json.dump(out, fh)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
