"""Module weights as safetensors: every tensor copied out, tied parameters once.

Shared by every model and engine: no checkpoint or export is ever a pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sarkit.errors import SarkitError


def save_weights(module: nn.Module, path: str | Path) -> None:
    """A module's weights as fp32 safetensors: tied parameters once, every tensor a copy.

    Copies make it work on ZeRO-3 gathered parameters, whose storage is shared with a flat
    buffer (which ``safetensors.torch.save_model`` refuses).
    """
    from safetensors.torch import save_file

    keys = set(module.state_dict().keys())
    state = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if name in keys:
            dtype = torch.float32 if t.is_floating_point() else t.dtype
            state[name] = t.detach().to("cpu", dtype, copy=True).contiguous()
    save_file(state, str(path))


def load_weights(module: nn.Module, path: str | Path, device: str | torch.device = "cpu") -> None:
    """Load what :func:`save_weights` wrote; only tied aliases may be absent from the file."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise SarkitError(f"{path}: weights file not found") from None
    except Exception as exc:  # a zero-byte, truncated or foreign file
        raise SarkitError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "the file is damaged: use another checkpoint or train again"
        ) from None
    saved_as = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    really_missing = [k for k in missing if k in saved_as]
    if really_missing or unexpected:
        raise SarkitError(
            f"{path}: weights do not fit the model (missing {really_missing[:3]}, "
            f"unexpected {list(unexpected)[:3]})"
        )
