"""Pretraining SAR-KnowLIP through the shared loop: the KnowLIP task, records, run folder.

A run folder holds, beside what the loop writes (checkpoints/, metrics.csv, tb/)::

    model.json  model.safetensors  momentum.safetensors   the final model (KnowLIP.from_run)
    export/vision.safetensors  export/vision.json         timm-loadable 1-channel ViT + its
                                                          preprocessing (mean, std, crop, pool)
    export/text/                                          save_pretrained BERT + tokenizer

The folder loads by itself on another machine: ``KnowLIP.from_run`` rebuilds the text
towers from ``export/text`` (never from the original model name) and the tokenizer comes
from there too. ``--init RUN`` starts a new schedule from such a folder (or from a checkpoint
folder): architecture, weights, and the momentum towers and queue when present.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sarkit import log
from sarkit.atomic import atomic_path, write_text
from sarkit.errors import SarkitError
from sarkit.model import TERRAIN_FIELDS
from sarkit.train.options import PretrainOptions
from sarkit.train.task import ModuleTask, MomentumTask, to_device


def choose_fields(records: list[dict], fields: tuple[str, ...] | None) -> tuple[str, ...]:
    """The segment order: given, the 8 terrain fields when present, else the first record's."""
    if fields:
        return tuple(fields)
    keys = list(records[0].get("texts") or {})
    if set(TERRAIN_FIELDS) <= set(keys):
        return TERRAIN_FIELDS
    return tuple(keys)


def model_config(options: PretrainOptions, fields: tuple[str, ...]):
    from sarkit.model.knowlip import KnowLIPConfig

    return KnowLIPConfig(
        vision=options.vision,
        image_size=options.image_size,
        vision_weights=options.vision_weights,
        vision_args=dict(options.vision_args),
        drop_path=options.drop_path,
        text=options.text,
        text_layers=options.text_layers,
        embed_dim=options.embed_dim,
        max_tokens=options.max_tokens,
        fields=fields,
        queue_size=options.queue_size,
        momentum=options.momentum,
        alpha=options.alpha,
        temp=options.temp,
        loss_weights=options.loss_weights,
        pool=options.pool,
        center_crop=options.center_crop,
        decoder_loss=options.decoder_loss,
        itm_segment_negatives=KnowLIPConfig.itm_segment_negatives
        if options.itm_segment_negatives is None
        else options.itm_segment_negatives,
    )


# ---------------------------------------------------------------- records


def usable_records(records: list[dict], source: str, strict: bool = False) -> list[dict]:
    """The records an image-text stage can train on; the others counted on stderr.

    Skipped: records the filter dropped (``quality.keep == false``), failed captions
    (``caption.failed``) and records with no text at all. ``strict`` makes any of them an
    error before training starts; no usable record at all is always one.
    """
    from sarkit.train.table import Skips, unusable

    kept, skips = [], Skips()
    for i, rec in enumerate(records, start=1):
        why = unusable(rec)
        if why is None:
            kept.append(rec)
        else:
            skips.add(why, f"{source}:{i} ({rec.get('id')})")
    skips.report(source, len(kept), strict)
    return kept


# ---------------------------------------------------------------- the task


class KnowLIPTask(MomentumTask, ModuleTask):
    """ITC + ITM + MLM with momentum distillation: the momentum towers, queue and alpha ramp
    are this task's, outside the engine (fp32 whatever the engine's precision)."""

    name = "knowlip"

    def __init__(self, model: Any, momentum: Any, codec: Any, options: PretrainOptions):
        super().__init__(model)
        self.momentum = momentum
        self.codec = codec
        self.options = options
        tok = codec.tokenizer
        self.special = [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]
        self.mask_id = tok.mask_token_id
        from sarkit.model.decoder import dec_token_id

        self.dec_id = dec_token_id(tok)
        self.rampup = 0
        self.heldout = None  # sarkit.train.heldout.HeldOut with --val

    def param_groups(self, weight_decay: float) -> list[dict]:
        from sarkit.train.engine import param_groups

        groups = param_groups(self.model, weight_decay, self.options.text_lr_scale)
        scale = getattr(self.options, "cross_attention_lr_scale", None)
        return groups if scale is None else cross_attention_groups(self.model, groups, scale)

    def inputs(self, batch: dict, device: torch.device, dtype: torch.dtype, step: int) -> dict:
        from sarkit.train.schedule import alpha_at

        keys = ("images", "input_ids", "attention_mask", "mlm_eligible", "groups")
        if "segment_ids" in batch:  # ITM's segment-swap negatives (itm_segment_negatives)
            keys += ("segment_ids",)
        kwargs = to_device({k: batch[k] for k in keys}, device, dtype)
        kwargs.update(
            momentum=self.momentum,
            alpha=alpha_at(step, self.options.alpha, self.rampup),
            special_ids=self.special,
            mask_id=self.mask_id,
            dec_id=self.dec_id,
        )
        return kwargs

    def evaluate(self, module: Any) -> dict[str, float]:
        return self.heldout.evaluate(module) if self.heldout is not None else {}

    def export(self, out: Path, module: Any, specs: dict, tensors: Any) -> None:
        export_run(out, module, specs, tensors, self.codec.tokenizer)

    def export_all_ranks(self, out: Path, main: bool) -> None:
        """momentum.safetensors (its split weights gathered a tensor at a time)."""
        from sarkit.model.weights import write_safetensors

        specs, tensors = self.momentum.exported()
        if main:
            with atomic_path(out / "momentum.safetensors") as tmp:
                write_safetensors(tmp, specs, tensors)
        for _ in tensors:  # every rank takes part in every gather
            pass


def cross_attention_groups(model: Any, groups: list[dict], scale: float) -> list[dict]:
    """`groups` with the text tower's and decoder's cross-attention layers moved to groups of
    their own at lr factor `scale`. They are new, randomly initialised weights (BERT has no
    cross-attention), so ``text_lr_scale``'s reason, keeping what BERT knows, does not hold
    for them (at 1 instead of 0.1 a briefly trained judge's ITM head still sat at its prior:
    docs/results.md, SCIO)."""
    cross = {id(p) for n, p in model.named_parameters() if ".crossattention." in n}
    out: list[dict] = []
    for group in groups:
        plain = [p for p in group["params"] if id(p) not in cross]
        moved = [p for p in group["params"] if id(p) in cross]
        if plain:
            out.append({**group, "params": plain})
        if moved:
            out.append({**group, "params": moved, "lr_scale": float(scale)})
    return out


def export_run(out: Path, model: Any, specs: dict, tensors: Any, tokenizer: Any) -> None:
    """model.json, the weights and the timm/transformers exports (see the module doc).

    `tensors` yields the full fp32 weights of `model` one at a time (its own parameters may
    be ZeRO-3 shards); each is written to model.safetensors and, for the towers, to their
    exports in the same pass, so no step holds the whole model twice, nor reads the file
    back (a memory-mapped read-back of ViT-L's vision tower was 1.2 GB more resident on
    rank 0).
    """
    from sarkit.model.text import plain_text_tower
    from sarkit.model.weights import SafetensorsWriter

    config = model.config
    write_text(out / "model.json", config.to_json())
    exp = out / "export"
    exp.mkdir(parents=True, exist_ok=True)
    vision = {k.removeprefix("vision."): v for k, v in specs.items() if k.startswith("vision.")}
    text: dict[str, torch.Tensor] = {}
    with (
        atomic_path(out / "model.safetensors") as model_tmp,
        atomic_path(exp / "vision.safetensors") as vision_tmp,
        SafetensorsWriter(model_tmp, specs) as model_out,
        SafetensorsWriter(vision_tmp, vision) as vision_out,
    ):
        for name, t in tensors:
            model_out.add(name, t)
            if name.startswith("vision."):
                vision_out.add(name.removeprefix("vision."), t)
            elif name.startswith("text."):
                text[name.removeprefix("text.")] = t
    write_text(exp / "vision.json", json.dumps(vision_meta(model), indent=2))
    text_tmp = exp / ".text.partial"
    shutil.rmtree(text_tmp, ignore_errors=True)
    plain_text_tower(model.text.config, text, text_tmp, tokenizer)
    shutil.rmtree(exp / "text", ignore_errors=True)
    os.replace(text_tmp, exp / "text")


def vision_meta(model: Any) -> dict:
    """What a timm user needs beside the weights: architecture and preprocessing."""
    c = model.config
    return {
        "timm_name": c.vision,
        "model_args": dict(c.vision_args),
        "in_chans": 1,
        "num_classes": 0,
        "img_size": c.image_size,
        "global_pool": "avg" if c.pool == "mean" else "token",
        "num_prefix_tokens": int(model.vision.num_prefix_tokens),
        "embed_dim": int(model.vision.num_features),
        # pixels: the tile's gray value in [0, 1] (sarkit's tile reader), centre crop
        # (side fraction), resize to img_size (bilinear, antialiased), then (x - mean) / std
        "center_crop": c.center_crop,
        "interpolation": "bilinear",
        "mean": [c.image_mean],
        "std": [c.image_std],
    }


# ---------------------------------------------------------------- --init


def resolve_init(spec: str) -> tuple[Path, Path, Path | None]:
    """(model.json, model weights, momentum state or None) of a run or checkpoint folder."""
    path = Path(spec)
    if not path.is_dir():
        raise SarkitError(f"--init {spec}: not a run folder or checkpoint folder")
    if (path / "state.json").exists():  # a checkpoint folder: checkpoints/step-N/
        config = path.parent.parent / "model.json"
        weights = path / "model.safetensors"
        momentum = path / "task.safetensors"
    else:
        config = path / "model.json"
        weights = path / "model.safetensors"
        momentum = path / "momentum.safetensors"
    for need in (config, weights):
        if not need.exists():
            raise SarkitError(f"--init {spec}: {need} is missing (not a sarkit run?)")
    return config, weights, momentum if momentum.exists() else None


# ---------------------------------------------------------------- building it all


def build_task(options: PretrainOptions, fields: Any, stats: Any):
    """(task, config): the model (new, or from --init) with its codec and momentum towers.

    `fields()` and `stats(config)` are asked only for a new model: the segment order and
    the tiles' pixel mean and standard deviation (from --init they come with the model).
    """
    from sarkit.model.knowlip import KnowLIP, Momentum, run_config
    from sarkit.model.text import TextCodec
    from sarkit.model.weights import load_weights

    torch.manual_seed(options.seed)
    init = resolve_init(options.init) if options.init else None
    if init:
        config = run_config(init[0].parent)
        model = KnowLIP(config, pretrained_text=False)
        load_weights(model, init[1])
        if options.itm_segment_negatives is not None:  # given: it overrides the run's
            config.itm_segment_negatives = float(options.itm_segment_negatives)
        log.info(f"initialised from {options.init} ({config.vision}, fields {config.fields})")
    else:
        config = model_config(options, fields())
        config.image_mean, config.image_std = stats(config)
        model = KnowLIP(config)
    codec = TextCodec.from_pretrained(config.text, config.fields, config.max_tokens)
    if options.grad_checkpointing:
        model.vision.set_grad_checkpointing(True)
        model.text.gradient_checkpointing_enable()
        model.decoder.gradient_checkpointing_enable()
    momentum = Momentum(model, config.queue_size, config.momentum)
    if init and init[2] is not None:
        from safetensors.torch import load_file

        momentum.load_state_dict(load_file(str(init[2])), strict=True)
    task = KnowLIPTask(model, momentum, codec, options)
    if options.val_path:
        task.heldout = heldout(options, config, codec)
    return task, config


def build(records: list[dict], options: PretrainOptions):
    """(task, dataset, collate) over records in memory: SCIO's stages (their collate reads
    the records' texts as they are rewritten)."""
    from sarkit.train.data import Augment, ImageTextCollate, TileDataset, pixel_stats

    base = Path(options.records_path).parent if options.records_path else None
    task, config = build_task(
        options,
        lambda: choose_fields(records, options.fields),
        lambda config: pixel_stats(records, base),
    )
    dataset = TileDataset(
        records,
        config.image_size,
        base,
        Augment() if options.augment else None,
        options.seed,
        config.image_mean,
        config.image_std,
        config.center_crop,
    )
    return task, dataset, ImageTextCollate(dataset.records, task.codec)


def build_pairs(source: Any, options: PretrainOptions):
    """(task, dataset, collate) of `sarkit pretrain`: the record table (tokenised once and
    cached beside the records, memory-mapped; see sarkit.train.table) and the batched
    loader (sarkit.train.pairs). `source` is a RecordFiles (a JSON Lines file or tar
    shards, streamed) or a list of records in memory."""
    from sarkit.model.text import TextCodec
    from sarkit.train.data import Augment
    from sarkit.train.pairs import PairDataset, passthrough
    from sarkit.train.table import RecordFiles, memory_table, open_table, unusable

    name = options.records_path or "records"
    files = isinstance(source, RecordFiles)
    base = (
        None if files and source.shards else (Path(name).parent if options.records_path else None)
    )
    state: dict[str, Any] = {}

    def first_usable() -> dict:
        for rec in source.records() if files else source:
            if unusable(rec) is None:
                return rec
        return {}

    def table(codec: Any):
        if files:
            return open_table(source.paths, source.items, codec, source.kind, name,
                              options.strict, Path(options.output))  # fmt: skip
        return memory_table(source, codec, name, options.strict)

    def dataset(config: Any, codec: Any, mean: float, std: float) -> PairDataset:
        return PairDataset(table(codec), config.image_size, base,
                           Augment() if options.augment else None, options.seed, mean, std,
                           config.center_crop, codec.pad_id)  # fmt: skip

    def stats(config: Any) -> tuple[float, float]:
        codec = TextCodec.from_pretrained(config.text, config.fields, config.max_tokens)
        state["dataset"] = dataset(config, codec, 0.5, 0.5)
        return state["dataset"].pixel_stats()

    def fields() -> tuple[str, ...]:
        first = first_usable()
        if not first:
            from sarkit.train.table import Skips

            skips = Skips()
            for rec in source.records() if files else source:
                skips.add(unusable(rec) or "empty", str(rec.get("id")))
            skips.report(name, 0, options.strict)
        return choose_fields([first], options.fields)

    task, config = build_task(options, fields, stats)
    ds = state.get("dataset")  # built for the pixel statistics of a new model
    if ds is None:
        ds = dataset(config, task.codec, config.image_mean, config.image_std)
    ds.mean, ds.std = config.image_mean, config.image_std
    return task, ds, passthrough


def heldout(options: PretrainOptions, config: Any, codec: Any):
    """The --val records, read and decoded once (a bad one is skipped and counted, as in
    training); fed to the model as the evaluation pass sees them: no augmentation."""
    from sarkit.records import load_all
    from sarkit.train.data import TileDataset
    from sarkit.train.heldout import HeldOut

    path = options.val_path
    records = usable_records(load_all(path, required=("id", "path")), path, options.strict)
    dataset = TileDataset(records, config.image_size, Path(path).parent, None, options.seed,
                          config.image_mean, config.image_std, config.center_crop)  # fmt: skip
    log.info(f"held out: {len(records)} records from {path}")
    return HeldOut(dataset, codec, options.batch_size)


def pretrain(records: Any, options: PretrainOptions) -> Path:
    """Train and return the run folder; the process group is torn down cleanly.

    `records`: a list of records, or a ``sarkit.train.table.RecordFiles`` (a JSON Lines
    file or tar shards, streamed into the cached record table, never all in memory)."""
    from sarkit.train.engine import teardown_distributed
    from sarkit.train.loop import Loop

    if options.deepspeed:
        from sarkit.train.engine import deepspeed_config
        from sarkit.train.memory import return_freed_memory

        zero = deepspeed_config(options.deepspeed, options).get("zero_optimization", {})
        if "offload_param" in zero or "offload_optimizer" in zero:
            return_freed_memory()  # before the model is built: see sarkit.train.memory
    try:
        task, dataset, collate = build_pairs(records, options)
        loop = Loop(task, dataset, collate, options)
        task.rampup = (
            options.alpha_rampup_steps
            if options.alpha_rampup_steps is not None
            else max(1, round(loop.steps_per_epoch))
        )
        out = loop.fit()
    except BaseException:
        teardown_distributed(clean=False)
        raise
    teardown_distributed()
    return out
