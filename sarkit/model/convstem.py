"""ViTs with a convolutional stem (ViT_C, Xiao et al. 2021), registered as timm models.

"Early convolutions help transformers see better": replacing the ViT's one-shot patchify
with a few stride-2 3x3 convolutions (BatchNorm, ReLU) and a 1x1 projection makes a
randomly initialised ViT train much faster on small data (MSTAR's 2,747 chips), at the same
token grid. The network stays timm's ``VisionTransformer``, only its ``embed_layer`` is this
stem, so everything that takes a timm ViT (pooling, ``reset_classifier``, the detector's
and segmenter's ``patch_embed.grid_size``, sarkit's exports) takes it too.

Registered names (``--vision``): ``vitc_tiny`` (width 192, 3 heads), ``vitc_small`` (384,
6); ``--vision-args`` shape them: ``patch_size`` is the stem's stride (a power of two: 16
= four stride-2 convolutions), ``stem_width`` the first convolution's channels (each next
stage doubles), ``stem_depth`` the 3x3 convolutions per stage (the first of each halves the
map; more put more of the work in convolutions, which learn fastest from few images),
``depth`` the number of transformer blocks; ``stem_kernel`` the convolutions' side (odd, 3
by default; A-ConvNets uses 5) and ``stem_pool=1`` makes every convolution stride 1 and
ends each stage with a 2x2 max-pool instead (A-ConvNets style: the first stage sees the
full resolution, and the pooling keeps the strongest scatterer of each 2x2, which SAR
chips' sparse bright returns favour). Importing this module registers
them (``sarkit.model.vision`` does before it builds anything).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn


class ConvStem(nn.Module):
    """Patch embedding as log2(patch_size) stages of conv + BN + ReLU, each halving the map
    (a stride-2 first convolution, or with ``stem_pool`` a 2x2 max-pool at its end), and a
    1x1 conv to ``embed_dim``; the attributes timm's ViT reads from a patch embedding are
    kept."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 1,
        embed_dim: int = 192,
        stem_width: int = 24,
        stem_depth: int = 1,
        stem_kernel: int = 3,
        stem_pool: bool = False,
        bias: bool = True,
        **_: Any,  # timm's other patch-embedding keywords (dynamic_img_pad, ...) do not apply
    ):
        super().__init__()
        p = patch_size if isinstance(patch_size, int) else patch_size[0]
        n = int(round(math.log2(p))) if p > 0 else -1
        if n < 1 or 2**n != p:
            raise ValueError(f"a conv stem's patch_size is a power of two >= 2, not {p}")
        if stem_depth < 1:
            raise ValueError(f"a conv stem's stem_depth is >= 1, not {stem_depth}")
        k = stem_kernel
        if k < 1 or k % 2 == 0:
            raise ValueError(f"a conv stem's stem_kernel is odd and >= 1, not {k}")
        layers: list[nn.Module] = []
        c = in_chans
        for i in range(n):
            w = stem_width * 2**i
            for j in range(stem_depth):  # without pooling the first convolution halves
                stride = 2 if j == 0 and not stem_pool else 1
                layers += [nn.Conv2d(c, w, k, stride, k // 2, bias=False)]
                layers += [nn.BatchNorm2d(w), nn.ReLU(True)]
                c = w
            if stem_pool:  # ceil_mode: an odd side rounds up, as a stride-2 conv's does
                layers += [nn.MaxPool2d(2, ceil_mode=True)]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, embed_dim, 1, bias=bias)
        self.patch_size = (p, p)
        self.set_input_size(img_size)

    def set_input_size(self, img_size: Any = None, patch_size: Any = None) -> None:
        """The token grid of an input size: each halving (a stride-2 conv with "same"
        padding, or a ceil-mode pool) rounds up."""
        if patch_size is not None and tuple(patch_size) != self.patch_size:
            raise ValueError("a conv stem's patch size is fixed when it is built")
        if img_size is not None:
            self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.grid_size = self.dynamic_feat_size(self.img_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> Any:
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return tuple(math.ceil(s / self.patch_size[0]) for s in img_size)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


def _vitc(embed_dim: int, heads: int, kwargs: dict) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if kwargs.pop("pretrained", False):
        raise ValueError("conv-stem ViTs have no published weights (use --init random or a run)")
    stem = partial(
        ConvStem,
        stem_width=int(kwargs.pop("stem_width", 24)),
        stem_depth=int(kwargs.pop("stem_depth", 1)),
        stem_kernel=int(kwargs.pop("stem_kernel", 3)),
        stem_pool=bool(int(kwargs.pop("stem_pool", 0))),
    )
    args = dict(patch_size=16, embed_dim=embed_dim, depth=12, num_heads=heads)
    args.update(kwargs)
    return VisionTransformer(embed_layer=stem, **args)


def _register() -> None:
    from timm.models import register_model

    def vitc_tiny(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        """ViT-Ti (192 wide, 3 heads) on a convolutional stem."""
        return _vitc(192, 3, {"pretrained": pretrained, **kwargs})

    def vitc_small(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        """ViT-S (384 wide, 6 heads) on a convolutional stem."""
        return _vitc(384, 6, {"pretrained": pretrained, **kwargs})

    for fn in (vitc_tiny, vitc_small):
        fn.__module__ = __name__
        register_model(fn)


_register()
