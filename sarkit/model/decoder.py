"""Causal language modelling and generation on KnowLIP's image-grounded BERT decoder.

KnowLIP's ``decoder`` (a transformers ``BertLMHeadModel`` with cross-attention) serves two
objectives with the same weights, as BLIP's text decoder shares all but its self-attention:

* **MLM** (bidirectional): ``sarkit.model.text.bert_hidden`` with a padding-only mask; rows
  start with ``[CLS]`` (TextCodec's layout).
* **LM** (causal, this module): rows start with :data:`DEC_TOKEN` instead of ``[CLS]``, then
  the text, then ``[SEP]`` as end of sequence; position t predicts token t + 1.

How the decoder tells the modes apart. The attention mask is what makes a pass causal; the
first token is what tells the shared weights which task they serve. The LM rows open with
``[unused0]`` in the place BLIP puts its added ``[DEC]`` token: it is in the bert-base-uncased
vocabulary already (no resized embeddings, so the tied output layer, saved checkpoints and the
plain text-tower export stay as they are), and it never occurs in MLM inputs, whose [CLS],
[SEP] and [MASK] keep their meaning.

Why this module builds its own masks (transformers 5.x, ``_attn_implementation="sdpa"``):
``BertModel.forward`` of a decoder config calls ``create_causal_mask``, which returns ``None``
when a batch has no padding and leaves causality to SDPA's ``is_causal``, read from each
self-attention module. ``text._bidirectional`` sets those flags to False for ITM/MLM, so a
plain ``decoder(ids, ...)`` over an unpadded batch is silently bidirectional (a padded batch
gets an explicit, causal mask: the bug shows only sometimes). Passing ``is_causal=True`` as a
forward kwarg is no fix: the kwarg also reaches the cross-attention, which would then mask
image tokens by position. Hence:

* training (:func:`lm_hidden`, :func:`lm_loss`) passes an explicit 4-D causal + padding mask,
  which transformers uses as-is; it depends on no module flag, so gradient checkpointing's
  recomputation sees the same mask;
* generation runs inside :func:`causal_self_attention`, which sets the self-attention flags
  (never the cross-attention's) to causal for the call and restores them.

Generation uses ``decoder.generate`` with ``encoder_hidden_states``: transformers expands
every tensor kwarg, the image states included, to ``batch * num_beams`` itself, so they are
not repeated here (BLIP#165), and the cache must be an ``EncoderDecoderCache`` (BERT's
cross-attention needs its own cache; the default ``DynamicCache`` fails). Prefixes of
different lengths are left-padded; generate derives position ids from the attention mask, so
every row's text starts at position 0 as in training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEC_TOKEN = "[unused0]"  # the LM-mode bos token (BLIP's [DEC]); see the module doc


def dec_token_id(tokenizer: Any) -> int:
    """The id of :data:`DEC_TOKEN` in a BERT vocabulary (1 in bert-base-uncased)."""
    tid = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {DEC_TOKEN} token")
    return int(tid)


def causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, L, L) mask: position t sees positions <= t that are not padding.

    Additive with ``finfo.min`` (not -inf) so a fully masked row (a left pad) softmaxes to a
    finite uniform row instead of NaN, which would otherwise spread through the values.
    """
    length = attention_mask.shape[1]
    keep = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    keep = keep[None, None] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


def lm_hidden(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_states: torch.Tensor | None,
) -> torch.Tensor:
    """Last hidden states of a causal pass (explicit mask: see the module doc for why)."""
    bert = decoder.bert
    dtype = bert.embeddings.word_embeddings.weight.dtype
    out = bert(
        input_ids=input_ids,
        attention_mask=causal_mask(attention_mask, dtype),
        encoder_hidden_states=image_states,
        use_cache=False,
    )
    return out.last_hidden_state


def lm_inputs(
    prefixes: Sequence[Sequence[int]] | None,
    targets: Sequence[Sequence[int]],
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded LM rows ``[DEC] prefix target [SEP]`` and each row's context length.

    The layout :func:`generate` continues from (bos + prefix), so a model trained on these
    rows is asked at generation time exactly what it learnt. ``max_tokens`` trims the prefix
    from its start (the target and the end of the prefix, nearest to it, are kept). Returns
    ``(input_ids, attention_mask, prefix_lengths)``; pass the last to :func:`lm_loss`.
    """
    prefixes = prefixes if prefixes is not None else [[] for _ in targets]
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes for {len(targets)} targets")
    rows, lengths = [], []
    for pre, tgt in zip(prefixes, targets, strict=True):
        pre, tgt = list(pre), list(tgt) + [eos_id]
        if max_tokens is not None:
            if len(tgt) > max_tokens - 1:  # the target alone is too long: cut it, keep eos
                tgt = tgt[: max(0, max_tokens - 2)] + [eos_id]
            pre = pre[max(0, len(pre) - (max_tokens - 1 - len(tgt))) :]
        rows.append([bos_id] + pre + tgt)
        lengths.append(1 + len(pre))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask, torch.tensor(lengths)


def lm_loss(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_states: torch.Tensor | None,
    *,
    prefix_lengths: int | torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    bos_id: int | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy of right-padded rows, conditioned on the image.

    ``image_states`` are already projected to the text width, (B, N, hidden). Targets are
    the tokens after the first; padding never is one, nor are the first ``prefix_lengths``
    tokens of a row (int or (B,): a prompt such as "a SAR image of", or other segments given
    as context, which the model reads but is not asked to write), nor tokens where
    ``target_mask`` (bool, like input_ids) is False. ``bos_id`` replaces each row's first
    token (e.g. TextCodec's [CLS] by :data:`DEC_TOKEN`), as BLIP does. BLIP smooths labels by
    0.1. ``reduction``: "mean" over every target token of the batch (BLIP); "sum" or
    "sample" (mean over the row's targets) give one value per row, to score candidates.
    Vocabulary logits are computed at target positions only (the head is most of the cost).
    """
    if bos_id is not None:
        input_ids = input_ids.clone()
        input_ids[:, 0] = bos_id
    hidden = lm_hidden(decoder, input_ids, attention_mask, image_states)
    b, length = input_ids.shape
    keep = attention_mask[:, 1:].bool()
    if prefix_lengths is not None:
        start = torch.as_tensor(prefix_lengths, device=input_ids.device).reshape(-1, 1)
        keep = keep & (torch.arange(1, length, device=input_ids.device)[None, :] >= start)
    if target_mask is not None:
        keep = keep & target_mask[:, 1:].bool()
    # the targets' (rows, columns) read once: each boolean index, forward and backward, is
    # a host sync on a GPU (the count is data-dependent)
    where = keep.nonzero(as_tuple=True)
    logits = decoder.cls(hidden[:, :-1][where]).float()
    token_loss = F.cross_entropy(
        logits, input_ids[:, 1:][where], label_smoothing=float(label_smoothing), reduction="none"
    )
    if reduction == "mean":
        if token_loss.numel() == 0:
            return hidden.sum() * 0.0  # keeps the graph (and DDP's hooks) alive
        return token_loss.mean()
    per_token = torch.zeros(b, length - 1, dtype=token_loss.dtype, device=token_loss.device)
    per_token = per_token.masked_scatter(keep, token_loss)
    if reduction == "sum":
        return per_token.sum(1)
    if reduction == "sample":
        return per_token.sum(1) / keep.sum(1).clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}: mean, sum or sample")


def _self_attentions(decoder: nn.Module) -> list[nn.Module]:
    """The self-attention cores (BertAttention.self of the non-cross attention blocks)."""
    cores = [
        m.self
        for m in decoder.modules()
        if hasattr(m, "is_cross_attention") and not m.is_cross_attention and hasattr(m, "self")
    ]
    if not cores or not all(hasattr(c, "is_causal") for c in cores):
        raise TypeError(f"{type(decoder).__name__}: no BERT self-attention with is_causal found")
    return cores


@contextlib.contextmanager
def causal_self_attention(decoder: nn.Module) -> Iterator[nn.Module]:
    """Make the decoder's self-attention causal for the block (cross-attention untouched).

    For transformers' own forward passes (generation), which leave causality to these flags
    whenever a batch has no padding; see the module doc.
    """
    cores = _self_attentions(decoder)
    before = [c.is_causal for c in cores]
    for c in cores:
        c.is_causal = True
    try:
        yield decoder
    finally:
        for c, flag in zip(cores, before, strict=True):
            c.is_causal = flag


def _left_padded(
    bos_id: int,
    pad_id: int,
    batch: int,
    prefix_ids: torch.Tensor | None,
    prefix_mask: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[DEC] prefix`` rows, right-aligned: generation appends to every row's last column."""
    rows: list[list[int]] = [[bos_id] for _ in range(batch)]
    if prefix_ids is not None:
        if prefix_ids.shape[0] != batch:
            raise ValueError(f"{prefix_ids.shape[0]} prefixes for {batch} images")
        real = prefix_mask.bool() if prefix_mask is not None else torch.ones_like(prefix_ids).bool()
        for i in range(batch):
            rows[i] += prefix_ids[i][real[i]].tolist()
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _zero3(decoder: nn.Module) -> bool:
    """Under DeepSpeed ZeRO-3 with several ranks every rank must run each forward."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(hasattr(p, "ds_numel") for p in decoder.parameters())


@torch.no_grad()
def generate(
    decoder: nn.Module,
    image_states: torch.Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    prefix_ids: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    *,
    num_beams: int = 1,
    max_new_tokens: int = 30,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    do_sample: bool = False,
    top_p: float = 0.9,
    top_k: int = 0,
    temperature: float = 1.0,
    seed: int | None = None,
    suppress_ids: Sequence[int] | None = None,
    synced_gpus: bool | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """Continuations of ``[DEC] prefix`` for each image: (B, T <= max_new_tokens) token ids.

    Greedy (default), beam search (``num_beams`` > 1, with ``length_penalty``), or nucleus
    sampling (``do_sample``, ``top_p``, ``temperature``; ``top_k`` 0 = off; ``seed`` makes
    it reproducible without touching the global RNG). ``prefix_ids``/``prefix_mask``: text
    the model continues from, e.g. the other segments and a field label, padded either side
    (no bos; it is added), variable length per sample. Rows end with ``eos_id`` when the
    model emitted it and are ``pad_id`` after. ``suppress_ids`` are never generated (default:
    bos and pad). ``repetition_penalty`` follows transformers: it counts the prefix too.
    ``synced_gpus`` (None: on when ZeRO-3 is partitioning the decoder over several ranks)
    keeps ranks stepping together. Extra kwargs go to ``decoder.generate``.
    """
    from transformers import GenerationConfig
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    batch, device = image_states.shape[0], image_states.device
    ids, mask = _left_padded(bos_id, pad_id, batch, prefix_ids, prefix_mask, device)
    options: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "min_new_tokens": int(min_new_tokens),
        "num_beams": int(num_beams),
        "do_sample": bool(do_sample),
        "repetition_penalty": float(repetition_penalty),
        "eos_token_id": int(eos_id),
        "pad_token_id": int(pad_id),
        "bos_token_id": int(bos_id),
        "use_cache": True,
    }
    suppress = [bos_id, pad_id] if suppress_ids is None else list(suppress_ids)
    if suppress:
        options["suppress_tokens"] = [int(s) for s in suppress]
    if num_beams > 1:
        options["length_penalty"] = float(length_penalty)
    if do_sample:
        options.update(top_p=float(top_p), top_k=int(top_k), temperature=float(temperature))
    if synced_gpus is None:
        synced_gpus = _zero3(decoder)
    config = decoder.config
    cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    rng = contextlib.nullcontext()
    if seed is not None:
        devices = [device] if device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=devices)
    was_training = decoder.training
    decoder.eval()
    try:
        with rng, causal_self_attention(decoder):
            if seed is not None:
                torch.manual_seed(int(seed))
            out = decoder.generate(
                input_ids=ids,
                attention_mask=mask,
                encoder_hidden_states=image_states,
                cache=cache,
                generation_config=GenerationConfig(**options),
                synced_gpus=bool(synced_gpus),
                **generate_kwargs,
            )
    finally:
        decoder.train(was_training)
    sequences = out.sequences if hasattr(out, "sequences") else out
    return _after_eos_padded(sequences[:, ids.shape[1] :], eos_id, pad_id)


def _after_eos_padded(ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Pad after each row's first end token; drop columns that are padding in every row.

    Beam search fills finished rows with eos, not pad, when pad_id is 0 (``pad or eos`` in
    transformers' beam search): this makes every mode's rows look the same.
    """
    is_eos = ids == eos_id
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    ids = ids.masked_fill(after, pad_id)
    used = (ids != pad_id).any(0).nonzero()
    return ids[:, : int(used.max()) + 1] if used.numel() else ids[:, :0]


def ids_to_text(
    tokenizer: Any, ids: torch.Tensor | Sequence[Sequence[int]], eos_id: int | None = None
) -> list[str]:
    """One string per row: cut at the first ``eos_id`` (default [SEP]), special tokens dropped.

    Cutting first matters for rows that go on past an end token (a caller's own decoding,
    sampled rows of other tools); :data:`DEC_TOKEN` is an ordinary vocabulary entry to the
    tokenizer, so it is dropped here too.
    """
    eos = tokenizer.sep_token_id if eos_id is None else eos_id
    dec = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
    cut = [r[: r.index(eos)] if eos in r else r for r in rows]
    cut = [[t for t in r if t != dec] for r in cut]
    return tokenizer.batch_decode(cut, skip_special_tokens=True, clean_up_tokenization_spaces=True)
