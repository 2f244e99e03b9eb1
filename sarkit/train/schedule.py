"""Learning-rate schedules as pure functions of the optimiser step.

The loop sets each step's rate from the step count alone, so a resumed run continues the
schedule exactly without any scheduler state in the checkpoint (torch's LambdaLR would keep
a ``last_epoch`` to save and restore beside DeepSpeed's own scheduler hooks; a function of
the step needs neither). Steps count optimiser steps, never micro-batches.

Kinds (all start with a linear warm-up from ``start`` to ``peak`` over ``warmup_steps``):

* ``step``: the paper's pretraining schedule (section 4.1, as BLIP/ALBEF): after warm-up,
  x ``decay`` per epoch, counted from the end of warm-up, floored at ``minimum``.
* ``cosine``: half-cosine from ``peak`` to ``minimum`` over the remaining steps
  (classification fine-tuning, paper Table 3).
* ``multistep``: x ``decay`` at each fraction of the run listed in ``milestones``
  (detection).
* ``poly``: ``peak * (1 - progress) ** power`` down to ``minimum`` (segmentation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("step", "cosine", "multistep", "poly")


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule; ``at(step)`` is the rate for optimiser step ``step`` (0-based)."""

    peak: float = 3e-4
    start: float = 1e-6
    warmup_steps: int = 3000
    minimum: float = 1e-6
    kind: str = "step"
    decay: float = 0.9
    steps_per_epoch: float = 1.0  # optimiser steps an epoch (``step`` kind)
    total_steps: int = 1  # the run's length in optimiser steps (cosine, multistep, poly)
    milestones: tuple[float, ...] = (0.75, 0.9)
    power: float = 0.9

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule '{self.kind}' (one of {', '.join(KINDS)})")

    def at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        after = step - self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, after / span)
        if self.kind == "step":
            epochs = int(after // max(self.steps_per_epoch, 1e-9))
            return max(self.minimum, self.peak * self.decay**epochs)
        if self.kind == "cosine":
            cos = 0.5 * (1.0 + math.cos(math.pi * progress))
            return self.minimum + (self.peak - self.minimum) * cos
        if self.kind == "multistep":
            passed = sum(1 for m in self.milestones if progress >= m)
            return max(self.minimum, self.peak * self.decay**passed)
        return max(self.minimum, self.peak * (1.0 - progress) ** self.power)


def alpha_at(step: int, alpha: float, rampup_steps: int) -> float:
    """Momentum-distillation weight ramped up linearly (ALBEF: over the first epoch)."""
    if rampup_steps <= 0:
        return alpha
    return alpha * min(1.0, step / rampup_steps)
