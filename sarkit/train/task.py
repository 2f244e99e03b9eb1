"""What the shared training loop asks of a model: a task owns its step, the loop the rest.

A model plugs in by returning ``{"loss": tensor, other scalars}`` from its ``forward``. A
:class:`TrainTask` wraps it: it turns a collated batch into the forward's keyword arguments,
does what must happen once per optimiser step outside the engine (KnowLIP's momentum
encoders), carries extra state for checkpoints, evaluates, and exports the final weights.
:class:`ModuleTask` is the plain case (a classifier, a detector): the batch is the forward's
arguments and there is nothing else to do. Pretraining, SCIO and every fine-tuning head go
through the same loop (``sarkit.train.loop.Loop``) this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to `device`; floating tensors of images (``images``) to the engine's dtype."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key == "images":
                value = value.to(dtype)
        out[key] = value
    return out


class ModuleTask:
    """A module whose ``forward(**batch)`` returns ``{"loss": ..., scalars}``.

    Subclasses override only what they need: ``inputs`` (which batch keys the forward takes,
    extra arguments), ``before_step``, ``extra_state``/``load_extra_state``, ``evaluate``,
    ``export``.
    """

    name = "module"

    def __init__(self, model: nn.Module, keys: tuple[str, ...] | None = None):
        self.model = model
        self.keys = keys

    def param_groups(self, weight_decay: float) -> list[dict]:
        from sarkit.train.engine import param_groups

        return param_groups(self.model, weight_decay)

    def inputs(self, batch: dict, device: torch.device, dtype: torch.dtype, step: int) -> dict:
        """The forward's keyword arguments for one micro-batch of optimiser step `step`."""
        if self.keys is not None:
            batch = {k: batch[k] for k in self.keys if k in batch}
        return to_device(batch, device, dtype)

    def before_step(self, step: int, engine: Any) -> None:
        """Called once per optimiser step, before its first micro-batch."""

    def to(self, device: torch.device) -> None:
        """Move what the task keeps outside the engine (after the engine placed the model)."""

    def attach(self, engine: Any) -> None:
        """Called once the engine is built (after `to`): e.g. split outside state as it splits."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the engine's (model + optimiser) that a resume needs (rank 0 saves)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def load_extra_file(self, path: Path, device: torch.device) -> None:
        """Load what `extra_state` saved (every rank)."""
        from safetensors.torch import load_file

        self.load_extra_state(load_file(str(path), device=str(device)))

    def rank_state(self) -> dict[str, torch.Tensor]:
        """Tensors each rank saves in a file of its own (ZeRO-3 shards of outside state);
        resumed by reading into the same tensors in place."""
        return {}

    def rank_numels(self) -> dict[str, int]:
        """Whole sizes of the `rank_state` tensors, to cut them anew for another world size."""
        return {}

    def export_all_ranks(self, out: Path, main: bool) -> None:
        """Exports that every rank takes part in (gathers of split outside state), after
        `export`; rank 0 (`main`) writes."""

    def evaluate(self, module: nn.Module) -> dict[str, float]:
        """Held-out metrics; called on every rank at once (ZeRO-3 forwards need all ranks)."""
        return {}

    def export(self, out: Path, module: nn.Module, specs: dict, tensors: Iterator) -> None:
        """Write the final model into the run folder (rank 0).

        `tensors` yields the full fp32 weights one at a time as `specs` lists them (the
        engine gathers each as it is asked for); `module` is the trained module, for its
        configuration only (under ZeRO-3 its parameters are shards).
        """
        write_weights(out / "model.safetensors", specs, tensors)


def write_weights(path: Path, specs: dict, tensors: Iterator) -> None:
    """A weights file written as the tensors come, atomically."""
    from sarkit.atomic import atomic_path
    from sarkit.model.weights import write_safetensors

    with atomic_path(path) as tmp:
        write_safetensors(tmp, specs, tensors)


class MomentumTask:
    """A task with momentum towers and queues outside the engine (pretraining, retrieval):
    fp32 whatever the engine's precision, split across the ranks under ZeRO-3, moved
    towards the live model (its temperature clamped) once per optimiser step."""

    momentum: Any

    def live(self, module: nn.Module) -> Any:
        """The KnowLIP model inside the engine's module."""
        return module

    def to(self, device: torch.device) -> None:
        self.momentum.to(device)

    def attach(self, engine: Any) -> None:
        if getattr(engine, "stage", 0) == 3:
            self.momentum.split(engine.config)

    def before_step(self, step: int, engine: Any) -> None:
        from sarkit.model.knowlip import TEMP_RANGE

        live = self.live(engine.module)
        engine.clamp_parameter(live.temp, *TEMP_RANGE)
        self.momentum.update(live, engine.gathered)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.momentum.whole_state()

    def rank_state(self) -> dict[str, torch.Tensor]:
        return self.momentum.shard_state()

    def rank_numels(self) -> dict[str, int]:
        return self.momentum.shard_numels()

    def load_extra_file(self, path: Path, device: torch.device) -> None:
        from sarkit.model.weights import read_into

        read_into(path, self.momentum.whole_state())
        self.momentum._load_counters()


EvalFn = Callable[[nn.Module], dict[str, float]]
