"""The paper's learning-rate schedule: linear warm-up, then x decay per epoch, floored."""

from __future__ import annotations


def learning_rate(
    step: int,
    epoch: int,
    lr: float = 3e-4,
    start: float = 1e-6,
    warmup_steps: int = 3000,
    decay: float = 0.9,
    minimum: float = 1e-6,
) -> float:
    """lr for optimizer step `step` (0-based) in `epoch` (0-based), as BLIP/ALBEF schedule it."""
    if step < warmup_steps:
        return start + (lr - start) * step / warmup_steps
    return max(minimum, lr * decay**epoch)


def alpha_at(step: int, alpha: float, rampup_steps: int) -> float:
    """Momentum-distillation weight ramped up linearly (ALBEF: over the first epoch)."""
    if rampup_steps <= 0:
        return alpha
    return alpha * min(1.0, step / rampup_steps)
