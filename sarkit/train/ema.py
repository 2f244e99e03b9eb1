"""An exponential moving average of a model's weights, for evaluation and the saved weights.

Late epochs of a small model on few images (MSTAR: 2,747 chips) swing by several points of
accuracy from one epoch to the next; the average of the weights over the last few hundred
optimiser steps is steadier and usually at least as good (Polyak averaging; timm's
``ModelEmaV3``). The average is a copy of the model, moved towards the live one after
every optimiser step by ``decay`` (warmed up as ``(1 + t) / (10 + t)`` over the first
steps, so the random init does not linger in it); buffers (BatchNorm's running statistics)
are copied, not averaged, since they describe the live model's activations.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """``module``: the average (a copy, in eval mode); ``update(live)`` after each step."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"an EMA decay is in (0, 1), not {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def rate(self) -> float:
        """This update's decay: the warm-up's while it is below ``decay``."""
        t = self.updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        d = self.rate()
        mine = [p for p in self.module.parameters()]
        theirs = [p.detach().to(m.dtype) for p, m in zip(live.parameters(), mine, strict=True)]
        torch._foreach_lerp_(mine, theirs, 1.0 - d)
        for b, src in zip(self.module.buffers(), live.buffers(), strict=True):
            b.copy_(src)
        self.updates += 1

    def to(self, device: torch.device) -> None:
        self.module.to(device)

    def state(self, prefix: str = "ema.") -> dict[str, torch.Tensor]:
        """The average's tensors and its update count (for a resumable checkpoint)."""
        out = {prefix + k: v.detach().clone() for k, v in self.module.state_dict().items()}
        out[prefix + "_updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return out

    def load_state(self, state: dict[str, torch.Tensor], prefix: str = "ema.") -> None:
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            return
        self.updates = int(own.pop("_updates", torch.tensor(0)).item())
        self.module.load_state_dict(own)
