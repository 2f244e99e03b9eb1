"""ITM must learn a task a glance separates: all-dark images say "dark", all-bright "bright".

The SCIO judge (MiniLM cut to one layer, text tower at a tenth of the lr) had its ITM loss
sit at the prior's entropy for whole runs: its head read the fused [CLS], which after
MiniLM's first self-attention is the same vector for every text, so the head saw the image
and never the text. This trains the same tower at the same lr scales on the separable task.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

PRIOR = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)  # 1 positive, 2 negatives: 0.6365
FIELD = ("caption",)


def separable_batch(codec, n: int, size: int) -> tuple[torch.Tensor, ...]:
    """n images, each all dark or all bright (with a little noise), and their one-word texts."""
    label = torch.randint(0, 2, (n,))
    images = (label.float() * 2 - 1)[:, None, None, None].expand(n, 1, size, size)
    images = images + 0.1 * torch.randn(n, 1, size, size)
    enc = codec.encode([{FIELD[0]: "bright" if y else "dark"} for y in label.tolist()])
    return images, enc.input_ids, enc.attention_mask, label


def train_itm(steps: int = 40, **config: object) -> list[float]:
    """The ITM loss of each step of a tiny KnowLIP (KnowLIPConfig fields `config` changed)
    trained on the separable task as `sarkit pretrain` trains the SCIO judge (lr 1e-3,
    --text-lr-scale 0.1, all three losses)."""
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig, Momentum
    from sarkit.model.text import TextCodec
    from sarkit.train.engine import adamw, param_groups, set_lr

    torch.manual_seed(0)
    settings = dict(vision="tiny", image_size=32, vision_args={"depth": 2}, text_layers=1,
                    embed_dim=32, max_tokens=16, fields=FIELD, queue_size=32, momentum=0.9,
                    decoder_loss="mlm")  # fmt: skip
    config = KnowLIPConfig(**{**settings, **config})
    model = KnowLIP(config)
    momentum = Momentum(model, config.queue_size, config.momentum)
    momentum.copy_from(model)
    codec = TextCodec.from_pretrained(None, FIELD, config.max_tokens)
    special = [codec.cls_id, codec.sep_id, codec.pad_id]
    optimizer = adamw(param_groups(model, 0.05, text_lr_scale=0.1), 1e-3)
    set_lr(optimizer, 1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        images, ids, mask, label = separable_batch(codec, 16, config.image_size)
        out = model(images, ids, mask, momentum, alpha=0.4, groups=label,
                    special_ids=special, mask_id=codec.mask_id)  # fmt: skip
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        momentum.update(model)
        losses.append(float(out["itm"].detach()))
    return losses


def test_itm_learns_a_separable_task_with_one_text_layer():
    losses = train_itm()  # the default: the head reads the fused tokens' mean
    last = sum(losses[-5:]) / 5
    assert last < 0.4, f"ITM loss {last:.3f} after {len(losses)} steps (prior {PRIOR:.4f})"


def test_itm_pool_follows_pool_and_old_runs_keep_cls():
    from sarkit.model.knowlip import KnowLIPConfig

    assert KnowLIPConfig().itm_pool == "mean"
    assert KnowLIPConfig(pool="cls").itm_pool == "cls"
    assert KnowLIPConfig(itm_pool="cls").itm_pool == "cls"
    assert KnowLIPConfig.from_dict(json.loads(KnowLIPConfig().to_json())).itm_pool == "mean"
    assert KnowLIPConfig.from_dict({"pool": "mean"}).itm_pool == "cls"  # saved before the field
    with pytest.raises(ValueError, match="itm_pool"):
        KnowLIPConfig(itm_pool="max")
