"""Measuring a KnowLIP on held-out VL rows: retrieval, captions, VQA answers.

Shared by the heads' per-epoch measurement, ``sarkit eval TASK`` and bench/vl.py. Images
are read without augmentation through the training data's tile reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sarkit import log
from sarkit.errors import SarkitError
from sarkit.tasks.vl.data import tile_dataset
from sarkit.tasks.vl.metrics import caption_scores, recall_at_k, vqa_accuracy


@torch.no_grad()
def image_batches(lip: Any, rows: Sequence[dict], base: Path, batch: int):
    """(start index, images tensor) over the rows' tiles, no augmentation."""
    tiles = tile_dataset(rows, base, lip.config, False, 0)
    for i in range(0, len(rows), batch):
        yield i, torch.stack([tiles[k][0] for k in range(i, min(len(rows), i + batch))])


@torch.no_grad()
def encode_gallery(lip: Any, codec: Any, rows: Sequence[dict], base: Path, batch: int = 32):
    """Image tokens and features, text ids/masks and features, and the pairings."""
    tokens, img_feat = [], []
    for _, images in image_batches(lip, rows, base, batch):
        t, f = lip.encode_images(images)
        tokens.append(t)
        img_feat.append(f)
    texts, txt2img, img2txt = [], [], []
    for i, row in enumerate(rows):
        img2txt.append(list(range(len(texts), len(texts) + len(row["captions"]))))
        for cap in row["captions"]:
            texts.append(cap)
            txt2img.append(i)
    enc = codec.encode([[t] for t in texts])
    txt_feat = torch.cat(
        [
            lip.text_feature(enc.input_ids[i : i + 256], enc.attention_mask[i : i + 256])
            for i in range(0, len(texts), 256)
        ]
    )
    return torch.cat(tokens), torch.cat(img_feat), enc, txt_feat, img2txt, txt2img


@torch.no_grad()
def itm_pair_logits(
    lip: Any,
    tokens: torch.Tensor,
    enc: Any,
    img_idx: torch.Tensor,
    txt_idx: torch.Tensor,
    batch: int = 64,
) -> torch.Tensor:
    """ITM match logits of the pairs (image img_idx[j], text txt_idx[j]), in batches, each
    batch's texts cut to its widest (shared by itm_rerank and `sarkit search --rerank`)."""
    out = []
    for s in range(0, len(img_idx), batch):
        ii, tt = img_idx[s : s + batch], txt_idx[s : s + batch]
        ids, mask = enc.input_ids[tt], enc.attention_mask[tt]
        width = int(mask.sum(1).max())
        out.append(lip.itm_logits(tokens[ii], ids[:, :width], mask[:, :width])[:, 1])
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def itm_rerank(
    lip: Any, tokens: torch.Tensor, enc: Any, sim: torch.Tensor, k: int, batch: int = 64
) -> tuple[np.ndarray, int]:
    """BLIP's evaluation: ITC similarity everywhere, the top k of each row and of each
    column re-scored as ITM match logit + ITC similarity; others at -100. Returns the
    (images x texts) score matrix for i2t ranking and t2i ranking (the same matrix when
    k = 0) and the number of pairs ITM scored."""
    n_img, n_txt = sim.shape
    if k <= 0:
        s = sim.numpy()
        return np.stack([s, s]), 0
    i2t = torch.full_like(sim, -100.0)
    t2i = torch.full_like(sim, -100.0)
    pairs = 0

    def score(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        return itm_pair_logits(lip, tokens, enc, img_idx, txt_idx, batch)

    kt = min(k, n_txt)
    top = sim.topk(kt, dim=1).indices
    rows = torch.arange(n_img).repeat_interleave(kt)
    cols = top.reshape(-1)
    i2t[rows, cols] = score(rows, cols) + sim[rows, cols]
    pairs += len(rows)
    ki = min(k, n_img)
    top = sim.T.topk(ki, dim=1).indices
    cols = torch.arange(n_txt).repeat_interleave(ki)
    rows = top.reshape(-1)
    t2i[rows, cols] = score(rows, cols) + sim[rows, cols]
    pairs += len(rows)
    return np.stack([i2t.numpy(), t2i.numpy()]), pairs


def retrieval_metrics(
    lip: Any, codec: Any, rows: Sequence[dict], base: Path, k: int = 128, batch: int = 32
) -> dict[str, float]:
    """R@1/5/10 both ways and means (ITM re-ranked), and the ITC-only mean for comparison."""
    was = lip.training
    lip.eval()
    try:
        tokens, img_feat, enc, txt_feat, img2txt, txt2img = encode_gallery(
            lip, codec, rows, base, batch
        )
        sim = (img_feat @ txt_feat.T).float()
        itc = recall_at_k(sim.numpy(), img2txt, txt2img)
        scores, _ = itm_rerank(lip, tokens, enc, sim, k)
    finally:
        lip.train(was)
    i2t = recall_at_k(scores[0], img2txt, txt2img)
    t2i = recall_at_k(scores[1], img2txt, txt2img)
    out = {key: v for key, v in i2t.items() if key.startswith("i2t")}
    out.update({key: v for key, v in t2i.items() if key.startswith("t2i")})
    out["r_mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2
    out["itc_r_mean"] = itc["r_mean"]
    out["images"] = float(len(rows))
    out["texts"] = float(len(txt2img))
    return out


@torch.no_grad()
def generate_texts(
    lip: Any,
    tokens: Any,
    rows: Sequence[dict],
    base: Path,
    prefixes: Sequence[str],
    batch: int = 16,
    **options: Any,
) -> list[str]:
    """The decoder's continuation of each row's prefix (prompt or question), given its image."""
    from sarkit.model.decoder import ids_to_text

    was = lip.training
    lip.eval()
    out: list[str] = []
    try:
        for i, images in image_batches(lip, rows, base, batch):
            pre = [tokens.ids(p) for p in prefixes[i : i + len(images)]]
            width = max(1, max(len(p) for p in pre))
            ids = torch.full((len(pre), width), tokens.pad, dtype=torch.long)
            mask = torch.zeros((len(pre), width), dtype=torch.long)
            for r, p in enumerate(pre):
                if p:
                    ids[r, : len(p)] = torch.tensor(p)
                    mask[r, : len(p)] = 1
            gen = lip.generate(images, tokens.bos, tokens.eos, tokens.pad, ids, mask, **options)
            out.extend(t.strip() for t in ids_to_text(tokens.tokenizer, gen, tokens.eos))
    finally:
        lip.train(was)
    return out


def caption_metrics(
    lip: Any,
    tokens: Any,
    rows: Sequence[dict],
    base: Path,
    prompt: str,
    beams: int = 3,
    max_new_tokens: int = 30,
    meteor: bool = True,
    spice_jars: Path | None = None,
    batch: int = 16,
    details: bool = False,
) -> dict:
    """Generate a caption per image (beam search after the prompt) and score it against the
    image's reference captions. An empty generation is named and counted, and fails the
    scoring rather than being scored as zero."""
    texts = generate_texts(
        lip,
        tokens,
        rows,
        base,
        [prompt] * len(rows),
        batch,
        num_beams=beams,
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,
    )
    refs = {str(r["id"]): r["captions"] for r in rows}
    cands = {
        str(r["id"]): (f"{prompt} {t}".strip() if prompt else t)
        for r, t in zip(rows, texts, strict=True)
    }
    empty = [str(r["id"]) for r, t in zip(rows, texts, strict=True) if not t]
    if empty:
        raise SarkitError(f"{len(empty)} empty generated caption(s) (first: {empty[0]})")
    scores = caption_scores(refs, cands, meteor=meteor, spice_jars=spice_jars)
    out: dict = {k: v for k, v in scores.items() if v is not None}
    out["spice"] = scores.get("spice")
    out["images"] = float(len(rows))
    if details:
        out["_samples"] = [{"id": k, "caption": v, "references": refs[k]} for k, v in cands.items()]
    else:
        out.pop("spice")
    return out


@torch.no_grad()
def rank_answers(
    lip: Any,
    tokens: Any,
    rows: Sequence[dict],
    base: Path,
    candidates: Sequence[Sequence[str]],
    batch: int = 8,
) -> list[str]:
    """For each question, the candidate answer (``candidates[i]``) of the highest
    likelihood (the lowest LM loss summed over its tokens) after the question, given the
    image."""
    from sarkit.model.decoder import lm_inputs, lm_loss

    out: list[str] = []
    was = lip.training
    lip.eval()
    try:
        for i, images in image_batches(lip, rows, base, batch):
            states = lip.image_to_text(lip.image_tokens(images))
            for r in range(len(images)):
                answers = list(candidates[i + r])
                q = tokens.ids(rows[i + r]["question"])
                ids, mask, lengths = lm_inputs(
                    [q] * len(answers),
                    [tokens.ids(a) for a in answers],
                    tokens.bos,
                    tokens.eos,
                    tokens.pad,
                    tokens.max_tokens,
                )
                st = states[r : r + 1].expand(len(answers), -1, -1)
                loss = lm_loss(lip.decoder, ids, mask, st, prefix_lengths=lengths, reduction="sum")
                out.append(answers[int(loss.argmin())])
    finally:
        lip.train(was)
    return out


def candidates_of(rows: Sequence[dict], vocab: dict) -> list[list[str]]:
    """Each question's candidates: the vocabulary's answers of its type (a count question
    is never answered "urban"; across types, short answers would win on summed loss),
    else the whole vocabulary."""
    by_type = vocab.get("by_type") or {}
    return [list(by_type.get(r["type"]) or vocab["answers"]) for r in rows]


def vqa_metrics(
    lip: Any,
    tokens: Any,
    rows: Sequence[dict],
    base: Path,
    mode: str = "generate",
    vocab: dict | None = None,
    batch: int = 16,
) -> tuple[dict[str, float], list[dict]]:
    """Accuracy per question type and overall; answers outside the vocabulary are counted
    (in rank mode they can never be right)."""
    if mode == "rank":
        if not vocab:
            raise SarkitError("--answer-mode rank needs the answer vocabulary (answers.json)")
        preds = rank_answers(
            lip, tokens, rows, base, candidates_of(rows, vocab), max(1, batch // 2)
        )
    else:
        preds = generate_texts(
            lip,
            tokens,
            rows,
            base,
            [r["question"] for r in rows],
            batch,
            num_beams=1,
            max_new_tokens=10,
        )
    items = [
        {
            "id": r.get("id"),
            "type": r["type"],
            "question": r["question"],
            "answer": r["answer"],
            "prediction": p,
        }
        for r, p in zip(rows, preds, strict=True)
    ]
    metrics = vqa_accuracy(items)
    if vocab:
        known = set(vocab["answers"])
        outside = [it for it in items if it["answer"] not in known]
        metrics["outside_vocabulary"] = float(len(outside))
        if outside:
            log.warn(
                f"{len(outside)} answer(s) outside the vocabulary (first: {outside[0]['id']}: "
                f"'{outside[0]['answer']}')"
            )
    return metrics, items
