"""The SAR-KnowLIP model: segment-aware text, losses, queue, scoring API, weight loading."""

from __future__ import annotations

import pytest
import torch

from sarkit.model import TERRAIN_FIELDS

TEXTS = [
    {f: f"{f.lower()} sentence {i} about a bright ship near the quay" for f in TERRAIN_FIELDS}
    for i in range(12)
]


@pytest.fixture(scope="module")
def tiny():
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig, Momentum
    from sarkit.model.text import TextCodec

    torch.manual_seed(0)
    cfg = KnowLIPConfig(
        vision="tiny", image_size=32, text_layers=1, embed_dim=32, queue_size=10, max_tokens=64
    )
    model = KnowLIP(cfg)
    momentum = Momentum(model, cfg.queue_size, cfg.momentum)
    momentum.copy_from(model)
    codec = TextCodec.from_pretrained(None, cfg.fields, cfg.max_tokens)
    return model, momentum, codec


def test_codec_keeps_segments_and_drops_or_masks(tiny):
    _, _, codec = tiny
    full = codec.encode(TEXTS[:2])
    assert full.input_ids[0, 0] == codec.cls_id
    seg = full.segment_ids[0]
    assert seg[0] == 0 and set(seg[seg > 0].tolist()) == set(range(1, 9))
    assert (full.input_ids[full.segment_ids == -1] == codec.pad_id).all()
    # every segment ends with [SEP]; segment order is the field order
    firsts = [int((seg == j + 1).nonzero()[0]) for j in range(8)]
    assert firsts == sorted(firsts)
    dropped = codec.encode(TEXTS[:2], drop=[[1], [0, 7]])
    assert 2 not in dropped.segment_ids[0].tolist() and 1 in dropped.segment_ids[0].tolist()
    assert 1 not in dropped.segment_ids[1].tolist() and 8 not in dropped.segment_ids[1].tolist()
    masked = codec.encode(TEXTS[:1], mask=[[2]])
    region = (masked.segment_ids[0] == 3) & (masked.input_ids[0] != codec.sep_id)
    assert (masked.input_ids[0][region] == codec.mask_id).all()
    assert int(region.sum()) == int(((seg == 3) & (full.input_ids[0] != codec.sep_id)).sum())
    one = codec.encode(TEXTS[:1], mask=[[2]], mask_lengths=[{2: 1}])
    assert int((one.input_ids[0] == codec.mask_id).sum()) == 1
    assert codec.decode_segment(full.input_ids[0], full.segment_ids[0], 0).startswith("terrain")


def test_codec_truncates_fairly():
    from sarkit.model.text import TextCodec

    codec = TextCodec.from_pretrained(None, ("a", "b", "c"), 24)
    texts = {"a": "short one", "b": " ".join(["long"] * 50), "c": " ".join(["mid"] * 20)}
    enc = codec.encode([texts])
    assert enc.input_ids.shape[1] == 24
    counts = [int((enc.segment_ids[0] == j).sum()) for j in (1, 2, 3)]
    assert counts[0] == 3  # the short segment is untouched ("short one" + [SEP])
    assert abs(counts[1] - counts[2]) <= 1  # the long ones share what is left


def test_losses_train_and_queue_takes_any_batch(tiny):
    model, momentum, codec = tiny
    special = [codec.cls_id, codec.sep_id, codec.pad_id]
    sizes = [4, 4, 3, 12]  # a partial batch, then a batch larger than the queue (10)
    ptrs, filled = [], []
    start = 0
    for n in sizes:
        enc = codec.encode([TEXTS[(start + k) % 12] for k in range(n)])
        images = torch.randn(n, 1, 32, 32)
        momentum.update(model)
        out = model(
            images, enc.input_ids, enc.attention_mask, momentum, 0.4, None, special, codec.mask_id
        )
        assert all(torch.isfinite(v) for v in out.values())
        model.zero_grad()
        out["loss"].backward()
        for part in ("vision", "text", "decoder", "itm_head", "vision_proj", "image_to_text"):
            grads = [p.grad for p in getattr(model, part).parameters() if p.grad is not None]
            assert grads and any(g.abs().sum() > 0 for g in grads), part
        assert model.temp.grad is not None
        ptrs.append(int(momentum.queue_ptr))
        filled.append(int(momentum.queue_filled))
        start += n
    assert ptrs == [4, 8, 1, 1] and filled == [4, 8, 10, 10]
    # total is the equal-weighted sum (the default decoder objective is MLM + causal LM)
    assert torch.allclose(out["loss"], out["itc"] + out["itm"] + out["mlm"] + out["lm"])


def test_momentum_is_an_ema(tiny):
    model, momentum, _ = tiny
    pairs = momentum.pairs(model)
    with torch.no_grad():  # live weights that differ from the momentum copy, or EMA is a no-op
        for _, p in pairs:
            p.add_(torch.randn_like(p))
    before = [p_m.clone() for p_m, _ in pairs]
    momentum.update(model)
    for (p_m, p), b in zip(pairs, before, strict=True):
        assert not torch.equal(p_m, b)
        assert torch.allclose(p_m, 0.995 * b + 0.005 * p.detach(), atol=1e-6)


def test_mlm_masking_rules():
    from sarkit.model.knowlip import mask_tokens

    torch.manual_seed(1)
    ids = torch.randint(1000, 2000, (64, 200))
    ids[:, 0], ids[:, -1] = 101, 102
    att = torch.ones_like(ids)
    eligible = torch.ones_like(ids, dtype=torch.bool)
    eligible[:, 100:150] = False
    out, labels = mask_tokens(ids, att, 0.15, 30522, 103, [101, 102], eligible)
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.15 * 147 / 200) < 0.01
    assert not chosen[:, 0].any() and not chosen[:, -1].any() and not chosen[:, 100:150].any()
    frac_mask = (out[chosen] == 103).float().mean().item()
    frac_kept = (out[chosen] == ids[chosen]).float().mean().item()
    assert 0.77 < frac_mask < 0.83 and 0.07 < frac_kept < 0.13
    assert torch.equal(out[~chosen], ids[~chosen])


def test_scoring_api_for_scio(tiny):
    model, _, codec = tiny
    model.eval()
    images = torch.randn(3, 1, 32, 32)
    enc = codec.encode(TEXTS[:3])
    scores = model.pair_scores(images, enc)
    assert scores["itc_sim"].shape == (3,) and scores["itm"].shape == (3,)
    assert ((scores["itm"] >= 0) & (scores["itm"] <= 1)).all()
    _, img = model.encode_images(images)
    txt = model.encode_texts(enc)
    fewer = model.encode_texts(codec.encode(TEXTS[:3], drop=[[0], [0], [0]]))
    loss_full = model.itc_pair_loss(img, txt, img, txt)
    loss_fewer = model.itc_pair_loss(img, fewer, img, txt)
    assert loss_full.shape == (3,) and not torch.allclose(loss_full, loss_fewer)
    masked = codec.encode(TEXTS[:3], mask=[[1], [2], [3]])
    filled = model.fill_masks(images, masked, codec.mask_id)
    was = masked.input_ids == codec.mask_id
    assert torch.equal(filled[~was], masked.input_ids[~was]) and not (filled == codec.mask_id).any()
    model.train()


def test_vision_takes_3_channel_weights_at_another_size(tmp_path):
    import timm
    from safetensors.torch import save_file

    from sarkit.model.vision import build_vision

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, in_chans=3)
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = build_vision("tiny", image_size=48, weights=str(path))
    w = model.patch_embed.proj.weight
    assert w.shape[1] == 1
    assert torch.allclose(w[:, 0], src.patch_embed.proj.weight.sum(1))
    assert model.pos_embed.shape == (1, 1 + 9, 192)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    torch.save(src.state_dict(), tmp_path / "rgb.pth")  # a plain tensor file loads too
    assert build_vision("tiny", 32, str(tmp_path / "rgb.pth")).patch_embed.proj.weight.shape[1] == 1
