"""Vision side: a timm ViT with a single-channel (SAR amplitude) input.

Weights come from random init, a timm pretrained name (``timm:NAME`` or ``--vision-weights
timm``), or a local file (safetensors, or a torch file read with ``weights_only=True``). A
3-channel patch embedding is summed over its channels to take 1-channel input, and the
position embedding is resampled when the image size differs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sarkit.errors import SarkitError

ALIASES = {
    "tiny": "vit_tiny_patch16_224",
    "small": "vit_small_patch16_224",
    "base": "vit_base_patch16_224",
    "large": "vit_large_patch16_224",
}


def vision_name(name: str) -> str:
    return ALIASES.get(name, name)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a plain torch file, never unpickling objects."""
    path = Path(path)
    if not path.exists():
        raise SarkitError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SarkitError(f"{path}: not a weights file readable safely ({exc})") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def adapt_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit a ViT state dict to `model`: 1-channel patch embedding, resized positions, no head."""
    from timm.layers import resample_abs_pos_embed

    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    key = "patch_embed.proj.weight"
    if key in state and key in own and state[key].shape[1] != own[key].shape[1]:
        w = state[key].float()
        if own[key].shape[1] == 1:
            state[key] = w.sum(dim=1, keepdim=True).to(state[key].dtype)
        else:
            raise SarkitError(f"cannot adapt {w.shape[1]}-channel weights to {own[key].shape[1]}")
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        no_class = getattr(model, "no_embed_class", False)
        prefix = 0 if no_class else getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], model.patch_embed.grid_size, num_prefix_tokens=prefix
        )
    return {k: v for k, v in state.items() if k in own and not k.startswith("head.")}


def build_vision(
    name: str,
    image_size: int = 224,
    weights: str | None = None,
    drop_path: float = 0.0,
    model_args: dict | None = None,
) -> torch.nn.Module:
    """A headless 1-channel timm ViT; `weights`: None (random), 'timm' (pretrained), or a file.

    `model_args` go to timm's constructor (e.g. ``depth``, ``patch_size``, ``embed_dim``).
    """
    import timm

    import sarkit.model.convstem  # noqa: F401  (registers the conv-stem ViTs with timm)

    name = vision_name(name)
    if name not in timm.list_models():
        raise SarkitError(
            f"unknown vision model '{name}' (any timm ViT name, or tiny/small/base/large)"
        )
    kwargs = dict(in_chans=1, num_classes=0, img_size=image_size, drop_path_rate=drop_path)
    kwargs.update(model_args or {})
    if weights == "timm":
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:
            raise SarkitError(
                f"could not fetch pretrained timm weights for '{name}' ({exc}); "
                "pass a local weights file instead"
            ) from exc
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:  # a keyword or size timm refuses
        given = ", ".join(f"{k}={v}" for k, v in (model_args or {}).items()) or "no extra args"
        raise SarkitError(
            f"timm cannot build '{name}' at {image_size} px with {given}: "
            f"{exc or type(exc).__name__}"
        ) from None
    if weights:
        state = adapt_state(model, load_state_file(weights))
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise SarkitError(f"{weights}: weights do not fit {name} (missing {missing[:3]} ...)")
    return model
