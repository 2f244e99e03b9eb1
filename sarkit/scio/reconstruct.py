"""Context-aware reconstruction (paper eq. 12-15): rewrite each noisy segment, keep it only
when it beats the original text.

The decoder writes segment j from the image and the other segments that were not flagged,
with j's field label as the prompt (the ``infill`` layout the SCIO stages train), until it
ends the segment itself (its own length, not the old segment's token count). With t the
original text and t_hat the text with the rewrite in place of p_j, the rewrite is accepted
when L_ITC(v, t_hat) < L_ITC(v, t) and s(v, t_hat) > s(v, t) (the same fixed bank as the
screening); otherwise the field is removed from the text and marked so.
"""

from __future__ import annotations

from typing import Any

import torch

from sarkit import log
from sarkit.scio import infill


def rewrite(
    model: Any,
    scorer: Any,
    codec: Any,
    pool: list[dict],
    groups: list[int],
    flagged: dict[int, set[str]],
    load_image: Any,
    dec_id: int,
    max_new_tokens: int,
    batch: int,
    rank: int = 0,
    world: int = 1,
) -> dict[int, dict[str, dict]]:
    """{pool index: {field: {"text", "ditc", "ditm", "accepted"}}} for every flagged segment.

    Chunks are `batch` flagged records in pool order; under torchrun rank r rewrites chunks
    c % world == r (the same chunks as one process: a generation's padding and its scores'
    rounding depend on what shares the chunk), so the ranks' results merged are one
    process's.
    """
    from sarkit.errors import SarkitError
    from sarkit.model.decoder import ids_to_text

    order = sorted(flagged)
    out: dict[int, dict[str, dict]] = {}
    budget = max(8, codec.max_tokens - max_new_tokens - 2)
    group_t = torch.as_tensor(groups)
    starts = list(range(0, len(order), batch))[rank::world]
    total = sum(len(order[s : s + batch]) for s in starts)
    with log.progress("scio rewrite", total=total) as advance:
        for s in starts:
            chunk, images = [], []
            for i in order[s : s + batch]:
                try:
                    images.append(load_image(i))
                    chunk.append(i)
                except SarkitError:
                    continue  # named by the screening already
            if not chunk:
                advance(len(order[s : s + batch]))
                continue
            images_t = torch.stack(images).to(scorer.device)
            pairs, prefixes = [], []
            for k, i in enumerate(chunk):
                segs = codec.segments(pool[i]["texts"])
                skip = {codec.fields.index(f) for f in flagged[i]}
                for name in sorted(flagged[i], key=codec.fields.index):
                    j = codec.fields.index(name)
                    pairs.append((k, i, name))
                    prefixes.append(infill.trim(infill.prefix(codec, segs, j, skip), budget))
            width = max(len(p) for p in prefixes)
            ids = torch.full((len(prefixes), width), codec.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(prefixes):
                ids[r, : len(p)] = torch.tensor(p)
                mask[r, : len(p)] = 1
            rows = torch.tensor([k for k, _, _ in pairs], device=scorer.device)
            gen = model.generate(
                images_t[rows],
                dec_id,
                codec.sep_id,
                codec.pad_id,
                ids.to(scorer.device),
                mask.to(scorer.device),
                max_new_tokens=max_new_tokens,
            )
            new_texts = [t.strip() for t in ids_to_text(codec.tokenizer, gen.cpu(), codec.sep_id)]
            tokens, img_feat = scorer.encode_images(images_t)
            owner, texts = [], []
            for k, i in enumerate(chunk):
                owner.append(k)
                texts.append(dict(pool[i]["texts"]))
            for (k, i, name), text in zip(pairs, new_texts, strict=True):
                variant = dict(pool[i]["texts"])
                variant[name] = text
                owner.append(k)
                texts.append(variant)
            loss, itm = scorer.score(tokens, img_feat, group_t[chunk], owner, texts)
            for r, ((k, i, name), text) in enumerate(zip(pairs, new_texts, strict=True)):
                row = len(chunk) + r
                ditc = float(loss[row] - loss[k])
                ditm = float(itm[row] - itm[k])
                out.setdefault(i, {})[name] = {
                    "text": text,
                    "ditc": round(ditc, 7),
                    "ditm": round(ditm, 7),
                    "accepted": bool(text) and ditc < 0 and ditm > 0,
                }
            advance(len(order[s : s + batch]))
    return out
