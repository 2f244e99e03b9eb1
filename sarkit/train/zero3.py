"""ZeRO-3 for the towers a task keeps outside the engine (KnowLIP's momentum encoders).

Under ZeRO-3 the trained module's parameters are split across the ranks, but a momentum
copy outside the engine stayed whole on every rank: 1.3 GB per rank for ViT-L, and its EMA
gathered the whole live model every step. Here such a module is split the same way
(DeepSpeed's own partitioning, so the live parameter and its momentum copy have the same
shard on each rank). The EMA then runs on the local shards with no communication, its
forward gathers one submodule's parameters at a time, and a checkpoint keeps each rank's
shards in a file of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def partition(module: nn.Module, ds_config: dict) -> None:
    """Split `module`'s parameters across the ranks as the engine's are, and gather each
    submodule's own parameters for the length of its forward."""
    import deepspeed

    dtypes = {p: p.dtype for p in module.parameters()}
    deepspeed.zero.Init(module=module, config_dict_or_path=ds_config, mem_efficient_linear=False)
    for p, dtype in dtypes.items():
        if p.ds_tensor is not None and p.ds_tensor.dtype != dtype:
            raise RuntimeError(f"ZeRO-3 stored a {dtype} parameter as {p.ds_tensor.dtype}")
    for sub in module.modules():
        own = list(sub.parameters(recurse=False))
        if own:
            _gather_in_forward(sub, own)


def _gather_in_forward(module: nn.Module, params: list[nn.Parameter]) -> None:
    import deepspeed

    open_: list[Any] = []

    def gather(*_: Any) -> None:
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        ctx.__enter__()
        open_.append(ctx)

    def release(*_: Any) -> None:
        open_.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(gather)
    module.register_forward_hook(release)


def is_split(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter, whose shard on this rank is the authoritative copy (small ones
    the engine keeps gathered, ``ds_persist``, too: its optimiser updates the shard)."""
    return getattr(p, "ds_tensor", None) is not None


def shard(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a ZeRO-3 parameter (padded flat), or the tensor itself."""
    return p.ds_tensor if is_split(p) else p


def full_tensors(
    pairs: list[tuple[str, torch.Tensor]], dtype: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole CPU copies, a tensor at a time; every rank must run it to its end (each split
    parameter's gather is collective)."""
    import deepspeed

    for name, t in pairs:
        if is_split(t):
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                full = t.detach().to("cpu", dtype(t), copy=True)
        else:
            full = t.detach().to("cpu", dtype(t))
        yield name, full
