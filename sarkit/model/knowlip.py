"""SAR-KnowLIP: ViT + BERT trained with ITC, ITM and MLM as ALBEF/BLIP do (paper section 3.3).

* ITC: symmetric InfoNCE on projected [CLS] features, learnable temperature (from 0.07,
  clamped to [0.001, 0.5]), negatives from the batch plus a feature queue filled by
  momentum encoders (m = 0.995), targets softened by momentum distillation (alpha 0.4,
  ramped up by the trainer).
* ITM: the text encoder cross-attends to the image tokens; a binary head scores a matched
  pair against one hard negative text per image and one hard negative image per text, drawn
  from the ITC similarity distribution over the whole (all-rank) batch.
* MLM: 15% of tokens masked (80% [MASK], 10% random, 10% kept) and reconstructed by a
  separate BERT decoder that cross-attends to the image.

The momentum encoders and queues live in :class:`Momentum`, outside the trained module, so
an engine (DDP, DeepSpeed ZeRO-3) manages only what is trained.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sarkit.model import TERRAIN_FIELDS
from sarkit.model.text import EncodedText, bert_hidden, build_bert
from sarkit.model.vision import build_vision, vision_name
from sarkit.model.weights import load_weights

TEMP_RANGE = (0.001, 0.5)
DECODER_LOSSES = ("mlm", "lm", "both")
POOLS = ("mean", "cls")
EMA_CHUNK = 20_000_000  # parameters gathered at once for the ZeRO-3 EMA step


@dataclass
class KnowLIPConfig:
    """Everything needed to rebuild the model; saved as model.json beside the weights."""

    vision: str = "vit_base_patch16_224"
    image_size: int = 224
    # pixel normalisation (x - mean) / std of [0, 1] tiles; the trainer measures both on
    # the training tiles: SAR chips can be mostly dark, and a large common offset drowns
    # the differences between images at the start of training
    image_mean: float = 0.5
    image_std: float = 0.5
    center_crop: float = 1.0  # side fraction of each tile kept before resizing
    vision_weights: str | None = None
    vision_args: dict[str, Any] = field(default_factory=dict)  # timm kwargs: depth, patch_size
    drop_path: float = 0.0
    text: str | None = None  # None: the offline all-MiniLM-L6-v2 BERT
    text_layers: int | None = None  # keep only the first N BERT layers (small test configs)
    embed_dim: int = 256
    max_tokens: int = 256
    fields: tuple[str, ...] = TERRAIN_FIELDS
    queue_size: int = 20000
    momentum: float = 0.995
    alpha: float = 0.4
    temp: float = 0.07
    mlm_prob: float = 0.15
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # ITC, ITM, MLM
    # ITC features: "mean" of the tokens, or "cls" (ALBEF/BLIP with BERT-base). The default
    # text tower, all-MiniLM-L6-v2, was trained as a mean-pooled sentence encoder: its
    # [CLS] carries little, and neither does a randomly initialised ViT's class token.
    pool: str = "mean"
    # what the ITM head reads of the fused pass: "mean" of the text tokens or [CLS] (ALBEF/
    # BLIP); None: as `pool`. MiniLM's [CLS] after its first self-attention is one vector
    # for every text (cosine >= 0.9998 between the 10 MSTAR classes' texts), so with
    # --text-layers 1 a [CLS] head sees the image but not the text and sits at its prior.
    # A run saved without this field read the [CLS] (``from_dict``).
    itm_pool: str | None = None
    # the decoder's objectives: "mlm" (the paper's masked LM), "lm" (BLIP's causal LM, which
    # generation needs: captions, answers, SCIO's rewritten segments) or "both" (summed; the
    # default, so a pretrained run can generate and still trains the paper's MLM)
    decoder_loss: str = "both"
    lm_label_smoothing: float = 0.1  # BLIP's
    # share of the images whose ITM negative text is their own text with one segment swapped
    # in from a less similar image of the batch (sarkit's, not the paper's: SCIO's dITM asks
    # the head whether one segment is wrong; ALBEF's hard negatives, texts of other images,
    # are near-duplicates of the positive on class-templated data and teach it nothing)
    itm_segment_negatives: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.itm_segment_negatives) <= 1.0:
            raise ValueError(f"itm_segment_negatives {self.itm_segment_negatives}: in [0, 1]")
        if self.decoder_loss not in DECODER_LOSSES:
            raise ValueError(
                f"decoder_loss {self.decoder_loss!r}: one of {', '.join(DECODER_LOSSES)}"
            )
        if self.itm_pool is None:
            self.itm_pool = self.pool
        if self.itm_pool not in POOLS:
            raise ValueError(f"itm_pool {self.itm_pool!r}: one of {', '.join(POOLS)}")
        self.vision = vision_name(self.vision)
        self.fields = tuple(self.fields)
        self.loss_weights = tuple(float(w) for w in self.loss_weights)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> KnowLIPConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.setdefault("itm_pool", "cls")  # saved before itm_pool: its head read [CLS]
        return cls(**kwargs)


# ---------------------------------------------------------------- distributed helpers


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank (gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        rank, world = _world()
        ctx.rank, ctx.n = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather(x: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
    """Concatenate a tensor of equal shape from every rank (identity in one process)."""
    import torch.distributed as dist

    _, world = _world()
    if world == 1:
        return x
    if with_grad:
        return _GatherWithGrad.apply(x)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def pad_width(enc_ids: torch.Tensor, enc_mask: torch.Tensor, pad_id: int):
    """Pad token batches to the widest across ranks so they can be gathered."""
    import torch.distributed as dist

    _, world = _world()
    if world == 1:
        return enc_ids, enc_mask
    width = torch.tensor([enc_ids.shape[1]], device=enc_ids.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    extra = int(width.item()) - enc_ids.shape[1]
    if extra:
        enc_ids = F.pad(enc_ids, (0, extra), value=pad_id)
        enc_mask = F.pad(enc_mask, (0, extra), value=0)
    return enc_ids, enc_mask


# ---------------------------------------------------------------- the model


class KnowLIP(nn.Module):
    """The trained part of SAR-KnowLIP; ``forward`` returns the three losses and their sum."""

    def __init__(self, config: KnowLIPConfig, pretrained_text: bool = True):
        super().__init__()
        self.config = config
        self.vision = build_vision(
            config.vision,
            config.image_size,
            config.vision_weights,
            config.drop_path,
            config.vision_args,
        )
        self.vision.reset_classifier(0, global_pool="")  # forward() -> all tokens
        self.text = build_bert(config.text, config.text_layers, True, False, not pretrained_text)
        self.decoder = build_bert(config.text, config.text_layers, True, True, not pretrained_text)
        vw, tw = self.vision.num_features, self.text.config.hidden_size
        self.vision_proj = nn.Linear(vw, config.embed_dim)
        self.text_proj = nn.Linear(tw, config.embed_dim)
        self.image_to_text = nn.Linear(vw, tw)  # cross-attention wants the text width
        self.itm_head = nn.Linear(tw, 2)
        # shape (1,): ZeRO-3 cannot partition a 0-dim parameter
        self.temp = nn.Parameter(torch.tensor([float(config.temp)]))
        tok = self.text.config
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.vocab_size = tok.vocab_size

    # -- towers ---------------------------------------------------------------------

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision(images)

    def image_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = pool_image(tokens, self.config.pool, self.vision.num_prefix_tokens)
        return F.normalize(self.vision_proj(pooled).float(), dim=-1)

    def text_feature(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = bert_hidden(self.text, input_ids, attention_mask)
        pooled = pool_text(hidden, attention_mask, self.config.pool)
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def itm_logits(
        self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Match logits (no, yes) of image i with text i, from the fused pass's pooled tokens
        (``config.itm_pool``)."""
        hidden = bert_hidden(self.text, input_ids, attention_mask, self.image_to_text(image_tokens))
        return self.itm_head(pool_text(hidden, attention_mask, self.config.itm_pool)).float()

    def mlm_logits(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        where: torch.Tensor | tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        """Vocabulary logits at the positions `where` only: bool like input_ids, or its
        (rows, columns) from ``nonzero(as_tuple=True)``, which a caller that also indexes
        the labels reads once (each boolean index is a host sync on a GPU).

        The vocabulary projection is most of the decoder's cost; masked positions are ~15%.
        """
        hidden = bert_hidden(
            self.decoder.bert, input_ids, attention_mask, self.image_to_text(image_tokens)
        )
        if isinstance(where, torch.Tensor):
            where = where.nonzero(as_tuple=True)
        return self.decoder.cls(hidden[where]).float()

    def temperature(self) -> torch.Tensor:
        """The ITC temperature, kept in TEMP_RANGE by clamping the parameter itself.

        Clamping a copy would zero the gradient once the parameter left the range, and it
        would never come back (ALBEF/BLIP clamp in place for this reason). The engines clamp
        their fp32 master copy too (``clamp_parameter``), which a bf16 copy cannot reach.
        """
        with torch.no_grad():
            self.temp.clamp_(*TEMP_RANGE)
        return self.temp.float()[0]

    # -- training -------------------------------------------------------------------

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        momentum: Momentum,
        alpha: float,
        mlm_eligible: torch.Tensor | None = None,
        special_ids: Sequence[int] = (),
        mask_id: int = 103,
        groups: torch.Tensor | None = None,
        dec_id: int = 1,
        lm_ids: torch.Tensor | None = None,
        lm_mask: torch.Tensor | None = None,
        lm_prefix: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The losses for one batch; also enqueues the momentum features (call once per step).

        ``groups`` (one integer per sample) marks pairs that describe the same thing (BLIP's
        ``idx``: several captions of one image, or interchangeable texts): within a group,
        ITC counts every pair as positive and ITM never draws a hard negative.
        ``lm_ids``/``lm_mask``/``lm_prefix``: the causal LM's own rows (decoder.lm_inputs
        layout, one per sample, e.g. SCIO's "other segments + field label -> segment"),
        trained instead of the full texts; the tokens before ``lm_prefix`` are context only.
        ``segment_ids`` (the codec's, like input_ids) lets ITM draw segment-swap negatives
        (``config.itm_segment_negatives``).
        """
        if groups is None:
            groups = _unique_groups(images.shape[0], images.device)
        w_itc, w_itm, w_mlm = self.config.loss_weights
        temp = self.temperature()
        img_tokens = self.image_tokens(images)
        img_feat = self.image_feature(img_tokens)
        txt_feat = self.text_feature(input_ids, attention_mask)

        # ITC with momentum distillation over batch + queue
        with torch.no_grad():
            img_feat_m, txt_feat_m = momentum.features(images, input_ids, attention_mask)
            q_img, q_txt, q_group = momentum.queued()
            img_all = torch.cat([img_feat_m, q_img])
            txt_all = torch.cat([txt_feat_m, q_txt])
            pos = (groups[:, None] == torch.cat([groups, q_group])[None, :]).float()
            hard = pos / pos.sum(1, keepdim=True)
            t_i2t = alpha * F.softmax(img_feat_m @ txt_all.T / temp, dim=1) + (1 - alpha) * hard
            t_t2i = alpha * F.softmax(txt_feat_m @ img_all.T / temp, dim=1) + (1 - alpha) * hard
        sim_i2t = img_feat @ txt_all.T / temp
        sim_t2i = txt_feat @ img_all.T / temp
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * t_i2t).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t_t2i).sum(1).mean()
        loss_itc = (loss_i2t + loss_t2i) / 2
        groups_all = gather(groups)
        momentum.enqueue(gather(img_feat_m), gather(txt_feat_m), groups_all)

        loss_itm = self._itm_loss(
            img_tokens,
            img_feat,
            txt_feat,
            input_ids,
            attention_mask,
            temp,
            groups,
            groups_all,
            segment_ids=segment_ids,
        )
        out: dict[str, torch.Tensor] = {"itc": loss_itc, "itm": loss_itm}
        loss = w_itc * loss_itc + w_itm * loss_itm
        objective = self.config.decoder_loss
        if objective in ("mlm", "both"):
            out["mlm"] = self._mlm_loss(
                img_tokens, input_ids, attention_mask, mlm_eligible, special_ids, mask_id
            )
            loss = loss + w_mlm * out["mlm"]
        if objective in ("lm", "both"):
            if lm_ids is not None:
                from sarkit.model.decoder import lm_loss

                out["lm"] = lm_loss(
                    self.decoder,
                    lm_ids,
                    lm_mask,
                    self.image_to_text(img_tokens),
                    prefix_lengths=lm_prefix,
                    label_smoothing=self.config.lm_label_smoothing if self.training else 0.0,
                )
            else:
                out["lm"] = self.lm_loss(
                    img_tokens, input_ids, attention_mask, mlm_eligible, dec_id
                )
            loss = loss + w_mlm * out["lm"]
        return {
            "loss": loss,
            **out,
            "temp": temp.detach().clone(),
            "alpha": torch.tensor(float(alpha)),
        }

    def _itm_loss(
        self,
        img_tokens,
        img_feat,
        txt_feat,
        input_ids,
        attention_mask,
        temp,
        groups,
        groups_all,
        segment_ids: torch.Tensor | None = None,
    ):
        """Matched pairs against one hard negative text per image and one hard negative
        image per text (ALBEF/BLIP). A negative whose text equals the positive's token for
        token is a match, not a negative, and is never drawn. With segment ids and
        ``config.itm_segment_negatives`` > 0, that share of the images get instead their own
        text with one segment swapped (``segment_swap_negatives``)."""
        rank, _ = _world()
        b = img_tokens.shape[0]
        ids_pad, mask_pad = pad_width(input_ids, attention_mask, self.pad_id)
        ids_all = gather(ids_pad)
        mask_all = gather(mask_pad)
        tokens_all = gather(img_tokens, with_grad=True)
        if ids_all.shape[0] < 2:  # no negative exists
            return img_tokens.sum() * 0.0
        with torch.no_grad():
            img_feat_all = gather(img_feat)
            txt_feat_all = gather(txt_feat)
            rows = torch.arange(b, device=img_tokens.device)
            own = rows + rank * b
            w_i2t = F.softmax(img_feat @ txt_feat_all.T / temp, dim=1)
            w_t2i = F.softmax(txt_feat @ img_feat_all.T / temp, dim=1)
            same = groups[:, None] == groups_all[None, :]
            same |= (ids_pad[:, None, :] == ids_all[None, :, :]).all(-1)  # identical texts
            same[rows, own] = True
            w_i2t = (torch.nan_to_num(w_i2t) + 1e-12).masked_fill(same, 0.0)
            w_t2i = (torch.nan_to_num(w_t2i) + 1e-12).masked_fill(same, 0.0)
            # a row whose every other sample shares its group: any other sample will do
            # (chosen with torch.where, not `if empty.any()`: no host sync per step)
            anyone = torch.ones_like(w_i2t)
            anyone[rows, own] = 0.0
            w_i2t = torch.where((w_i2t.sum(1) == 0)[:, None], anyone, w_i2t)
            w_t2i = torch.where((w_t2i.sum(1) == 0)[:, None], anyone, w_t2i)
            neg_txt = draw_one(w_i2t)
            neg_img = draw_one(w_t2i)
            width = ids_pad.shape[1]
            neg_ids, neg_mask = ids_all[neg_txt, :width], mask_all[neg_txt, :width]
            share = float(self.config.itm_segment_negatives)
            if share > 0 and segment_ids is not None and b > 1:
                neg_ids, neg_mask = segment_swap_negatives(
                    input_ids,
                    segment_ids,
                    img_feat,
                    groups,
                    share,
                    neg_ids,
                    neg_mask,
                    self.pad_id,
                    self.config.max_tokens,
                )
        width = max(ids_pad.shape[1], neg_ids.shape[1])
        ids_pad = F.pad(ids_pad, (0, width - ids_pad.shape[1]), value=self.pad_id)
        mask_pad = F.pad(mask_pad, (0, width - mask_pad.shape[1]), value=0)
        neg_ids = F.pad(neg_ids, (0, width - neg_ids.shape[1]), value=self.pad_id)
        neg_mask = F.pad(neg_mask, (0, width - neg_mask.shape[1]), value=0)
        ids = torch.cat([ids_pad, ids_pad, neg_ids])
        mask = torch.cat([mask_pad, mask_pad, neg_mask])
        tokens = torch.cat([img_tokens, tokens_all[neg_img], img_tokens])
        logits = self.itm_logits(tokens, ids, mask)
        labels = torch.cat(
            [torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]
        ).to(logits.device)
        return F.cross_entropy(logits, labels)

    def lm_loss(
        self,
        img_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        eligible: torch.Tensor | None = None,
        dec_id: int = 1,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Causal LM loss of the texts given the image (segments not `eligible` are read as
        context but never targets, as SCIO's noise pool is kept out of MLM)."""
        from sarkit.model.decoder import lm_loss

        return lm_loss(
            self.decoder,
            input_ids,
            attention_mask,
            self.image_to_text(img_tokens),
            target_mask=eligible,
            bos_id=dec_id,
            label_smoothing=self.config.lm_label_smoothing if self.training else 0.0,
            reduction=reduction,
        )

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        prefix_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Token ids the decoder writes for each image, optionally continuing a prefix
        (``sarkit.model.decoder.generate`` has the options: beams, sampling, lengths)."""
        from sarkit.model.decoder import generate

        states = self.image_to_text(self.image_tokens(images))
        return generate(
            self.decoder, states, bos_id, eos_id, pad_id, prefix_ids, prefix_mask, **options
        )

    def _mlm_loss(self, img_tokens, input_ids, attention_mask, eligible, special_ids, mask_id):
        ids, labels = mask_tokens(
            input_ids,
            attention_mask,
            self.config.mlm_prob,
            self.vocab_size,
            mask_id,
            special_ids,
            eligible,
        )
        where = (labels != -100).nonzero(as_tuple=True)  # the step's one read of the masks
        logits = self.mlm_logits(img_tokens, ids, attention_mask, where)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels[where])

    # -- scoring API for SCIO and evaluation -----------------------------------------

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, normalised ITC feature) for a batch of 1-channel images."""
        tokens = self.image_tokens(images)
        return tokens, self.image_feature(tokens)

    @torch.no_grad()
    def encode_texts(self, enc: EncodedText) -> torch.Tensor:
        """Normalised ITC features of an encoded text batch (drop/mask segments via the codec)."""
        return self.text_feature(enc.input_ids, enc.attention_mask)

    @torch.no_grad()
    def itm_scores(self, image_tokens: torch.Tensor, enc: EncodedText) -> torch.Tensor:
        """P(match) for each (image i, text i) pair."""
        logits = self.itm_logits(image_tokens, enc.input_ids, enc.attention_mask)
        return logits.softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def pair_scores(self, images: torch.Tensor, enc: EncodedText) -> dict[str, torch.Tensor]:
        """Per pair i: cosine similarity (ITC) and match probability (ITM) of image i, text i."""
        tokens, img_feat = self.encode_images(images)
        txt_feat = self.encode_texts(enc)
        return {"itc_sim": (img_feat * txt_feat).sum(-1), "itm": self.itm_scores(tokens, enc)}

    @torch.no_grad()
    def itc_pair_loss(
        self,
        img_feat: torch.Tensor,
        txt_feat: torch.Tensor,
        bank_img: torch.Tensor,
        bank_txt: torch.Tensor,
        exclude: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-pair symmetric InfoNCE of (image i, text i) against banks of other features.

        L_ITC(v_i, t_i) in the paper's eq. 10/14: the pair's own similarity contrasted with
        the bank (e.g. the other texts and images of a batch, or the model's queue).
        ``exclude`` (bool, pairs x bank) keeps bank entries out of row i's negatives: the
        pair's own queued features, or texts of its group, which are not negatives.
        """
        temp = self.temperature()
        pos = (img_feat * txt_feat).sum(-1, keepdim=True) / temp
        neg_t = img_feat @ bank_txt.T / temp
        neg_i = txt_feat @ bank_img.T / temp
        if exclude is not None:
            neg_t = neg_t.masked_fill(exclude, float("-inf"))
            neg_i = neg_i.masked_fill(exclude, float("-inf"))
        i2t = torch.cat([pos, neg_t], dim=1)
        t2i = torch.cat([pos, neg_i], dim=1)
        return -(F.log_softmax(i2t, dim=1)[:, 0] + F.log_softmax(t2i, dim=1)[:, 0]) / 2

    @torch.no_grad()
    def fill_masks(self, images: torch.Tensor, enc: EncodedText, mask_id: int) -> torch.Tensor:
        """The input ids with each [MASK] replaced by the decoder's best token."""
        tokens = self.image_tokens(images)
        out = enc.input_ids.clone()
        where = out == mask_id
        logits = self.mlm_logits(tokens, enc.input_ids, enc.attention_mask, where)
        out[where] = logits.argmax(-1)
        return out

    # -- saving ---------------------------------------------------------------------

    @classmethod
    def from_run(cls, run_dir: str | Path, map_location: str = "cpu") -> KnowLIP:
        """Rebuild a trained model from a run folder (model.json + model.safetensors).

        Needs nothing outside the folder: the text towers' architecture comes from the run's
        own ``export/text`` (the original name may not resolve on this machine).
        """
        run_dir = Path(run_dir)
        config = run_config(run_dir)
        model = cls(config, pretrained_text=False)
        load_weights(model, run_dir / "model.safetensors", map_location)
        return model


def run_config(run_dir: str | Path) -> KnowLIPConfig:
    """A run folder's model config, pointed at the folder's own text export."""
    from sarkit.errors import SarkitError

    run_dir = Path(run_dir)
    path = run_dir / "model.json"
    try:
        config = KnowLIPConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise SarkitError(f"{run_dir}: not a sarkit run folder (no model.json)") from None
    except (ValueError, TypeError) as exc:
        raise SarkitError(f"{path}: damaged model config ({exc})") from None
    config.vision_weights = None
    if (run_dir / "export" / "text" / "config.json").exists():
        config.text = str(run_dir / "export" / "text")
    return config


def segment_swap_negatives(
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    img_feat: torch.Tensor,
    groups: torch.Tensor,
    share: float,
    neg_ids: torch.Tensor,
    neg_mask: torch.Tensor,
    pad_id: int,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM negative texts (``neg_ids``/``neg_mask``, one per image) with `share` of them
    replaced by the image's own text with one segment swapped: SCIO's question ("is one
    segment wrong?") as a training signal. sarkit's addition to the paper's ITM.

    For a chosen image i a field is drawn among i's non-empty segments (one some partner can
    change), then a partner k of
    this rank's batch: another group, the same field non-empty with different tokens, and
    among those the less similar half by image feature (a partner that looks like i likely
    says the same in other words: a false negative). Segment j's tokens (with its [SEP]) are
    replaced by k's; the result is cut to ``max_tokens`` inside the swapped segment. A row
    with no such partner keeps its ALBEF negative.
    """
    b = input_ids.shape[0]
    pick = (torch.rand(b) < share).tolist()
    if not any(pick):
        return neg_ids, neg_mask
    ids_l, seg_l = input_ids.tolist(), segment_ids.tolist()
    sim = (img_feat.float() @ img_feat.float().T).cpu()
    grp = groups.tolist()

    def pieces(row: int) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for t, s in zip(ids_l[row], seg_l[row], strict=True):
            if s >= 1:
                out.setdefault(s, []).append(t)
        return out

    segs = [pieces(i) for i in range(b)]
    swapped: dict[int, list[int]] = {}
    for i in range(b):
        if not pick[i]:
            continue
        fields = [s for s, toks in segs[i].items() if len(toks) > 1]  # more than its [SEP]
        if not fields:
            continue
        cands: list[int] = []
        for f in torch.randperm(len(fields)).tolist():  # the first field some partner differs in
            s = fields[f]
            cands = [
                k
                for k in range(b)
                if k != i and grp[k] != grp[i] and len(segs[k].get(s, ())) > 1
                and segs[k][s] != segs[i][s]
            ]  # fmt: skip
            if cands:
                break
        if not cands:
            continue
        order = sorted(cands, key=lambda k: float(sim[i, k]))
        low = order[: max(1, (len(order) + 1) // 2)]
        k = low[int(torch.randint(len(low), (1,)))]
        before = [t for t, g in zip(ids_l[i], seg_l[i], strict=True) if 0 <= g < s]
        after = [t for t, g in zip(ids_l[i], seg_l[i], strict=True) if g > s]
        middle = segs[k][s]
        room = max_tokens - len(before) - len(after)
        if len(middle) > room:
            middle = middle[: max(0, room - 1)] + middle[-1:]
        swapped[i] = before + middle + after
    if not swapped:
        return neg_ids, neg_mask
    width = max(neg_ids.shape[1], *(len(r) for r in swapped.values()))
    ids = F.pad(neg_ids, (0, width - neg_ids.shape[1]), value=pad_id)
    mask = F.pad(neg_mask, (0, width - neg_mask.shape[1]), value=0)
    for i, row in swapped.items():
        ids[i] = pad_id
        mask[i] = 0
        ids[i, : len(row)] = torch.tensor(row, dtype=ids.dtype, device=ids.device)
        mask[i, : len(row)] = 1
    return ids, mask


def draw_one(weights: torch.Tensor) -> torch.Tensor:
    """One index per row, drawn in proportion to `weights` (non-negative, no row all zero).

    ``torch.multinomial(weights, 1)`` draws exactly so (argmax of weights over Exp(1) noise,
    the same random numbers), after two checks of the weights that read them back to the
    host: two host syncs per call on a GPU, four per step. The rows here are checked by
    construction (softmax plus 1e-12, all-zero rows replaced).
    """
    return (weights / torch.empty_like(weights).exponential_(1)).argmax(dim=-1)


def _unique_groups(n: int, device: torch.device) -> torch.Tensor:
    """Every sample its own group (no duplicates declared): negative ids never reused."""
    global _GROUP_COUNTER
    rank, world = _world()
    start = _GROUP_COUNTER
    _GROUP_COUNTER += n
    return -1 - (torch.arange(start, start + n, device=device) * world + rank)


_GROUP_COUNTER = 0


def pool_image(tokens: torch.Tensor, pool: str, prefix: int) -> torch.Tensor:
    """One vector per image: the class token, or the mean of the patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, prefix:].mean(1)


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pool: str) -> torch.Tensor:
    """One vector per text: [CLS], or the mean over real tokens (sentence-transformers style)."""
    if pool == "cls":
        return hidden[:, 0]
    w = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prob: float,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `prob` of the eligible tokens; 80% [MASK], 10% random, 10% kept."""
    ids = input_ids.clone()
    labels = input_ids.clone()
    can = attention_mask.bool()
    for sid in special_ids:
        can &= input_ids != sid
    if eligible is not None:
        can &= eligible.bool()
    # masked_fill/where rather than boolean-index assignment: the same values and random
    # draws, without a nonzero (a host sync on a GPU) per assignment
    chosen = (torch.rand(ids.shape, device=ids.device) < prob) & can
    labels.masked_fill_(~chosen, -100)
    to_mask = (torch.rand(ids.shape, device=ids.device) < 0.8) & chosen
    ids.masked_fill_(to_mask, mask_id)
    to_random = (torch.rand(ids.shape, device=ids.device) < 0.5) & chosen & ~to_mask
    random_words = torch.randint(vocab_size, ids.shape, device=ids.device)
    ids = torch.where(to_random, random_words, ids)
    return ids, labels


class Momentum(nn.Module):
    """Momentum (EMA) encoders for ITC plus the image and text feature queues.

    The queue is a ring buffer: any batch size works, including a last partial batch and
    batches larger than the queue. Only the filled part is used as negatives, so no random
    vectors pose as negatives at the start.
    """

    def __init__(self, model: KnowLIP, queue_size: int, momentum: float):
        super().__init__()
        self.m = float(momentum)
        self.pool = model.config.pool
        self.prefix = model.vision.num_prefix_tokens
        self.vision = copy.deepcopy(model.vision)
        self.vision_proj = copy.deepcopy(model.vision_proj)
        self.text_proj = copy.deepcopy(model.text_proj)
        self.text = _text_only_copy(model.text)
        for p in self.parameters():
            p.requires_grad_(False)
        d = model.config.embed_dim
        self.register_buffer("image_queue", torch.zeros(queue_size, d))
        self.register_buffer("text_queue", torch.zeros(queue_size, d))
        self.register_buffer("group_queue", torch.zeros(queue_size, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        # host copies of queue_ptr and queue_filled: reading the buffers every step would be
        # a host sync on a GPU (None: read them once, after a load_state_dict)
        self._ptr: int | None = None
        self._filled: int | None = None

    def pairs(self, model: KnowLIP) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(momentum parameter, live parameter) pairs, matched by name."""
        live = dict(model.named_parameters())
        return [(p, live[name]) for name, p in self.named_parameters()]

    @torch.no_grad()
    def update(
        self,
        model: KnowLIP,
        gathered: Callable[[list], Any] | None = None,
        chunk: int = EMA_CHUNK,
    ) -> None:
        """EMA step towards the live model.

        Towers split by :meth:`split` move on their local shards (no communication);
        otherwise `gathered` gives full ZeRO-3 parameters, gathered in chunks of about
        `chunk` elements, never the whole model at once (ViT-L: 1.2 GB more per rank).
        """
        from sarkit.train.zero3 import is_split, shard

        pairs = self.pairs(model)
        local = [(shard(p_m), shard(p)) for p_m, p in pairs if is_split(p_m)]
        for a, b in local:
            if a.shape != b.shape:  # the engine split its parameter otherwise
                raise RuntimeError(f"momentum shard {tuple(a.shape)} != live {tuple(b.shape)}")
        self._lerp([(a, b if b.device == a.device else b.to(a.device)) for a, b in local])
        pairs = [(p_m, p) for p_m, p in pairs if not is_split(p_m)]
        if gathered is None:
            self._lerp(pairs)
            return
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        size = 0
        for p_m, p in pairs:
            group.append((p_m, p))
            size += p_m.numel()
            if size >= chunk:
                with gathered([q for _, q in group]):
                    self._lerp(group)
                group, size = [], 0
        if group:
            with gathered([q for _, q in group]):
                self._lerp(group)

    def split(self, ds_config: dict) -> None:
        """Split the towers across the ranks as ZeRO-3 splits the live model (call after
        the engine is built): 1/world of the momentum weights per rank."""
        from sarkit.train.zero3 import partition

        partition(self, ds_config)

    def whole_state(self) -> dict[str, torch.Tensor]:
        """The state every rank holds whole (queues, unsplit weights): rank 0 saves it."""
        from sarkit.train.zero3 import is_split

        return {k: v for k, v in self.state_dict(keep_vars=True).items() if not is_split(v)}

    def shard_state(self) -> dict[str, torch.Tensor]:
        """This rank's shards of the split weights (empty unless :meth:`split`)."""
        from sarkit.train.zero3 import is_split

        return {k: v.ds_tensor for k, v in self.named_parameters() if is_split(v)}

    def shard_numels(self) -> dict[str, int]:
        """The whole sizes of the :meth:`shard_state` tensors."""
        from sarkit.train.zero3 import is_split

        return {k: int(v.ds_numel) for k, v in self.named_parameters() if is_split(v)}

    def exported(self) -> tuple[dict, Any]:
        """(name -> (dtype, shape), whole fp32 CPU tensors one at a time) for
        momentum.safetensors; every rank must run the iterator (split weights gather)."""
        from sarkit.model.weights import saved_dtype, saved_tensors
        from sarkit.train.zero3 import full_tensors

        pairs = saved_tensors(self)
        specs = {n: (saved_dtype(t), tuple(getattr(t, "ds_shape", t.shape))) for n, t in pairs}
        return specs, full_tensors(pairs, saved_dtype)

    def _load_counters(self) -> None:
        self._ptr = self._filled = None  # the loaded buffers are read again when needed

    def _lerp(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        same = [(p_m, p) for p_m, p in pairs if p_m.dtype == p.dtype]
        if same:  # a few fused launches per step on a GPU, not two per tensor
            ms, ps = [p_m for p_m, _ in same], [p.detach() for _, p in same]
            torch._foreach_lerp_(ms, ps, 1 - self.m)
        for p_m, p in pairs:
            if p_m.dtype != p.dtype:
                p_m.mul_(self.m).add_(p.detach().to(p_m.dtype), alpha=1 - self.m)

    @torch.no_grad()
    def copy_from(self, model: KnowLIP) -> None:
        for p_m, p in self.pairs(model):
            p_m.copy_(p.detach())

    @torch.no_grad()
    def features(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC features of the momentum towers, which stay fp32 whatever the engine's precision.

        Under DeepSpeed bf16/fp16 the engine hands over half-precision images; the towers run
        them under autocast in that precision (fp32 weights, half-precision matmuls), as a
        plain-PyTorch autocast run does, so the EMA keeps full precision.
        """
        half = images.dtype in (torch.bfloat16, torch.float16)
        ctx = torch.autocast(images.device.type, dtype=images.dtype) if half else nullcontext()
        with ctx:
            tokens = self.vision(images.float())
            pooled = pool_image(tokens, self.pool, self.prefix)
            img = F.normalize(self.vision_proj(pooled).float(), dim=-1)
            hidden = bert_hidden(self.text, input_ids, attention_mask)
            txt = F.normalize(
                self.text_proj(pool_text(hidden, attention_mask, self.pool)).float(), dim=-1
            )
        return img, txt

    def _counters(self) -> tuple[int, int]:
        if self._ptr is None or self._filled is None:
            self._ptr, self._filled = int(self.queue_ptr), int(self.queue_filled)
        return self._ptr, self._filled

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._load_counters()

    def queued(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self._counters()[1]
        return (
            self.image_queue[:n].clone(),
            self.text_queue[:n].clone(),
            self.group_queue[:n].clone(),
        )

    @torch.no_grad()
    def enqueue(self, img_feat: torch.Tensor, txt_feat: torch.Tensor, groups: torch.Tensor) -> None:
        size = self.image_queue.shape[0]
        if size == 0:
            return
        img_feat, txt_feat, groups = img_feat[-size:], txt_feat[-size:], groups[-size:]
        n = img_feat.shape[0]
        ptr, filled = self._counters()
        idx = (torch.arange(n, device=img_feat.device) + ptr) % size
        self.image_queue[idx] = img_feat.to(self.image_queue.dtype)
        self.text_queue[idx] = txt_feat.to(self.text_queue.dtype)
        self.group_queue[idx] = groups.to(self.group_queue.device)
        self._ptr, self._filled = (ptr + n) % size, min(size, filled + n)
        self.queue_ptr.fill_(self._ptr)
        self.queue_filled.fill_(self._filled)


def _text_only_copy(bert: nn.Module) -> nn.Module:
    """The momentum text encoder needs no cross-attention: a plain bidirectional BERT copy."""
    from transformers import BertModel

    from sarkit.model.text import _bidirectional

    config = bert.config.__class__.from_dict(bert.config.to_dict())
    config.is_decoder = False
    config.add_cross_attention = False
    config._attn_implementation = bert.config._attn_implementation
    plain = BertModel(config, add_pooling_layer=False)
    state = {k: v for k, v in bert.state_dict().items() if "crossattention" not in k}
    plain.load_state_dict(state, strict=True)
    _bidirectional(plain)
    return plain
