"""The model pieces SCIO leans on: dropping a segment never re-trims the others, a per-pair
ITC loss with bank entries kept out, and the decoder's own LM rows in the forward."""

from __future__ import annotations

import torch

from sarkit.model import TERRAIN_FIELDS


def test_drop_keeps_the_truncation_of_the_full_text():
    from sarkit.model.text import TextCodec

    codec = TextCodec.from_pretrained(None, ("a", "b", "c"), 24)
    texts = {"a": "short one", "b": " ".join(["long"] * 50), "c": " ".join(["mid"] * 20)}
    full = codec.encode([texts])
    dropped = codec.encode([texts], drop=[[0]])
    for j in (2, 3):  # segments b and c keep exactly the tokens they had in the full text
        assert torch.equal(
            full.input_ids[0][full.segment_ids[0] == j],
            dropped.input_ids[0][dropped.segment_ids[0] == j],
        )
    assert 1 not in dropped.segment_ids[0].tolist()
    assert int(dropped.attention_mask.sum()) == int(full.attention_mask.sum()) - 3


def test_itc_pair_loss_excludes_bank_entries():
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig

    torch.manual_seed(0)
    model = KnowLIP(KnowLIPConfig(vision="tiny", image_size=32, text_layers=1, embed_dim=8))
    f = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    img, txt, bank_i, bank_t = f[:2], f[2:4], f[2:6], f[2:6]
    # the bank holds each pair's own text (rows 0 and 1 of the bank): excluded, the loss
    # equals the loss against the rest of the bank
    exclude = torch.zeros(2, 4, dtype=torch.bool)
    exclude[0, 0] = exclude[1, 1] = True
    with_ex = model.itc_pair_loss(img, txt, bank_i, bank_t, exclude)
    rest = model.itc_pair_loss(img[:1], txt[:1], bank_i[1:], bank_t[1:])
    assert torch.allclose(with_ex[:1], rest)
    assert not torch.allclose(with_ex, model.itc_pair_loss(img, txt, bank_i, bank_t))


def test_forward_trains_the_decoder_on_given_lm_rows():
    from sarkit.model.decoder import lm_inputs
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig, Momentum
    from sarkit.model.text import TextCodec

    torch.manual_seed(0)
    cfg = KnowLIPConfig(vision="tiny", image_size=32, text_layers=1, embed_dim=16,
                        queue_size=8, max_tokens=64, decoder_loss="lm")  # fmt: skip
    model = KnowLIP(cfg)
    momentum = Momentum(model, 8, 0.9)
    codec = TextCodec.from_pretrained(None, TERRAIN_FIELDS, 64)
    texts = [{f: f"{f} of tile {i}" for f in TERRAIN_FIELDS} for i in range(2)]
    enc = codec.encode(texts)
    tok = codec.tokenizer
    ids, mask, prefix = lm_inputs([tok("roads :")["input_ids"][1:-1]] * 2,
                                  [tok("a road")["input_ids"][1:-1]] * 2,
                                  1, codec.sep_id, codec.pad_id)  # fmt: skip
    images = torch.randn(2, 1, 32, 32)
    args = (images, enc.input_ids, enc.attention_mask, momentum, 0.0)
    model.eval()
    own = model(*args, lm_ids=ids, lm_mask=mask, lm_prefix=prefix)["lm"]
    full = model(*args)["lm"]
    from sarkit.model.decoder import lm_loss

    states = model.image_to_text(model.image_tokens(images))
    expect = lm_loss(model.decoder, ids, mask, states, prefix_lengths=prefix)
    assert torch.allclose(own, expect) and not torch.allclose(own, full)


def test_segment_swap_negatives_change_one_segment_for_a_different_one():
    """Each chosen image's negative is its own text with exactly one segment replaced by the
    same field of another group's text, where that field differs (never the same words);
    the less similar half of the batch supplies the partner; share 0 keeps ALBEF's rows."""
    from sarkit.model.knowlip import segment_swap_negatives
    from sarkit.model.text import TextCodec

    codec = TextCodec.from_pretrained(None, ("a", "b", "c"), 40)
    texts = [{"a": f"alpha {i}", "b": "bravo " + "x" * (i + 1), "c": "same"} for i in range(6)]
    enc = codec.encode(texts)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])  # pairs of duplicates: never partners
    feat = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    base = torch.full_like(enc.input_ids, codec.pad_id), torch.zeros_like(enc.attention_mask)
    kept = segment_swap_negatives(enc.input_ids, enc.segment_ids, feat, groups, 0.0, *base,
                                  codec.pad_id, 40)  # fmt: skip
    assert kept[0] is base[0]
    torch.manual_seed(0)
    ids, mask = segment_swap_negatives(enc.input_ids, enc.segment_ids, feat, groups, 1.0, *base,
                                       codec.pad_id, 40)  # fmt: skip
    sim = feat @ feat.T

    def segs(row: torch.Tensor, m: torch.Tensor) -> list[str]:
        words = codec.tokenizer.decode(row[m > 0].tolist()).split("[SEP]")
        return [w.replace("[CLS]", "").strip() for w in words[:3]]

    own = [segs(enc.input_ids[i], enc.attention_mask[i]) for i in range(6)]
    for i in range(6):
        neg = segs(ids[i], mask[i])
        changed = [j for j in range(3) if neg[j] != own[i][j]]
        assert len(changed) == 1 and changed[0] != 2, (i, neg)  # "c" is the same everywhere
        j = changed[0]
        partners = [k for k in range(6) if own[k][j] == neg[j]]
        assert partners and all(groups[k] != groups[i] for k in partners)
        others = sorted((float(sim[i, k]), k) for k in range(6) if groups[k] != groups[i])
        low_half = {k for _, k in others[: (len(others) + 1) // 2]}
        assert set(partners) & low_half


def test_segment_negatives_change_itm_only():
    """The forward with segment ids and itm_segment_negatives 1: ITC (computed before the
    negatives are drawn) is the plain forward's, ITM differs (other negatives)."""
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig, Momentum
    from sarkit.model.text import TextCodec

    torch.manual_seed(0)
    cfg = KnowLIPConfig(vision="tiny", image_size=32, text_layers=1, embed_dim=16, max_tokens=64)
    model = KnowLIP(cfg).eval()
    codec = TextCodec.from_pretrained(None, cfg.fields, cfg.max_tokens)
    texts = [{f: f"{f.lower()} {i} about a ship" for f in TERRAIN_FIELDS} for i in range(4)]
    enc = codec.encode(texts)
    images = torch.randn(4, 1, 32, 32)
    out = []
    for share in (0.0, 1.0):
        model.config.itm_segment_negatives = share
        momentum = Momentum(model, 8, cfg.momentum)
        momentum.copy_from(model)
        torch.manual_seed(1)
        with torch.no_grad():
            out.append(model(images, enc.input_ids, enc.attention_mask, momentum, 0.4,
                             segment_ids=enc.segment_ids))  # fmt: skip
    assert torch.equal(out[0]["itc"], out[1]["itc"])
    assert not torch.equal(out[0]["itm"], out[1]["itm"])
