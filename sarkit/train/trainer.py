"""The pretraining loop: data, engine, schedule, checkpoints, logs and export.

A run folder holds::

    model.json  model.safetensors  momentum.safetensors   the final model (KnowLIP.from_run)
    export/vision.safetensors  export/vision.json         timm-loadable 1-channel ViT
    export/text/                                          save_pretrained BERT + tokenizer
    checkpoints/step-NNNNNNNN/  checkpoints/latest        resumable state (atomic)
    metrics.csv  tb/                                      per-step losses, lr, samples/s

Resuming restores weights, optimiser, queue, momentum encoders, schedule position and
every rank's RNG state, and skips the samples already seen in the epoch, so the resumed
loss sequence equals an uninterrupted run's.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from sarkit import log
from sarkit.atomic import atomic_path, write_text
from sarkit.errors import SarkitError
from sarkit.model import TERRAIN_FIELDS
from sarkit.train.options import PretrainOptions

CSV_FIELDS = ("step", "epoch", "loss", "itc", "itm", "mlm", "lr", "alpha", "temp", "samples_s")


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
    )


class Trainer:
    """Build everything from options; ``fit`` trains and returns the run folder."""

    def __init__(self, records: list[dict], options: PretrainOptions):
        from sarkit.train.data import Augment, ImageTextCollate, TileDataset, check_records
        from sarkit.train.engine import make_engine, setup_distributed

        self.options = options
        self.out = Path(options.output)
        source = options.records_path or "records"
        check_records(records, source)
        self.rank, self.world, self.device = setup_distributed(bool(options.deepspeed))
        self.main = self.rank == 0
        torch.manual_seed(options.seed)

        from sarkit.model.knowlip import KnowLIP, Momentum
        from sarkit.model.text import TextCodec
        from sarkit.train.data import pixel_stats

        base = Path(options.records_path).parent if options.records_path else None
        self.fields = choose_fields(records, options.fields)
        self.config = model_config(options, self.fields)
        self.config.image_mean, self.config.image_std = pixel_stats(records, base)
        self.codec = TextCodec.from_pretrained(options.text, self.fields, options.max_tokens)
        model = KnowLIP(self.config)
        if options.grad_checkpointing:
            model.vision.set_grad_checkpointing(True)
            model.text.gradient_checkpointing_enable()
            model.decoder.gradient_checkpointing_enable()
        self.momentum = Momentum(model, options.queue_size, options.momentum).to(self.device)
        self.engine = make_engine(model, options, self.device, self.world)
        self.momentum.to(self.device)
        with self.engine.full_weights() as full:
            self.momentum.copy_from(full)

        augment = Augment() if options.augment else None
        self.dataset = TileDataset(
            records,
            options.image_size,
            base,
            augment,
            options.seed,
            self.config.image_mean,
            self.config.image_std,
            options.center_crop,
        )
        from sarkit.train.data import EpochSampler

        self.sampler = EpochSampler(len(records), options.seed, self.rank, self.world)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=options.batch_size,
            sampler=self.sampler,
            num_workers=options.workers,
            collate_fn=ImageTextCollate(self.dataset.records, self.codec),
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # keep the global RNG untouched: resumes stay exact
            drop_last=False,
        )
        self.steps_per_epoch = math.ceil(self.sampler.per_rank / options.batch_size)
        self.total_steps = self.steps_per_epoch * options.epochs
        if options.max_steps is not None:
            self.total_steps = min(self.total_steps, options.max_steps)
        self.rampup = (
            options.alpha_rampup_steps
            if options.alpha_rampup_steps is not None
            else self.steps_per_epoch
        )
        tok = self.codec.tokenizer
        self.special = [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]
        self.mask_id = tok.mask_token_id
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0

    # ---------------------------------------------------------------- checkpoints

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        from sarkit.model.knowlip import save_weights
        from sarkit.train.engine import barrier

        final = self.ckpt_dir / f"step-{self.step:08d}"
        tmp = self.ckpt_dir / f".step-{self.step:08d}.partial"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        self.engine.save(tmp, self.rank)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_file(rng, str(tmp / f"rng-rank{self.rank}.safetensors"))
        if self.main:
            save_weights(self.momentum, tmp / "momentum.safetensors")
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "world": self.world,
                "engine": self.engine.name,
                "batch_size": self.options.batch_size,
                "seed": self.options.seed,
            }
            write_text(tmp / "state.json", json.dumps(state, indent=2))
        barrier()
        if self.main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text(self.ckpt_dir / "latest", final.name + "\n")
            kept = sorted(self.ckpt_dir.glob("step-*"))
            for old in kept[: max(0, len(kept) - self.options.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def find_checkpoint(self, spec: str) -> Path:
        if spec == "latest":
            pointer = self.ckpt_dir / "latest"
            if not pointer.exists():
                raise SarkitError(f"{self.ckpt_dir}: no checkpoint to resume from")
            return self.ckpt_dir / pointer.read_text().strip()
        path = Path(spec)
        if not (path / "state.json").exists():
            raise SarkitError(f"{spec}: not a checkpoint folder (no state.json)")
        return path

    def load_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import load_file

        from sarkit.model.knowlip import load_weights

        state = json.loads((folder / "state.json").read_text())
        if state["world"] != self.world or state["batch_size"] != self.options.batch_size:
            log.warn(
                f"{folder}: saved with {state['world']} process(es) x batch "
                f"{state['batch_size']}; resuming with {self.world} x {self.options.batch_size}"
                " continues, but not sample for sample"
            )
        if state["engine"] != self.engine.name:
            raise SarkitError(
                f"{folder}: saved by the {state['engine']} engine; resume with the same engine"
            )
        self.engine.load(folder)
        load_weights(self.momentum, folder / "momentum.safetensors", self.device)
        rng_file = folder / f"rng-rank{self.rank}.safetensors"
        if rng_file.exists():
            rng = load_file(str(rng_file))
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # ---------------------------------------------------------------- logs

    def _open_logs(self, resumed: bool):
        if not self.main:
            return None, None
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "metrics.csv"
        rows = []
        if resumed and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= self.step]
        fh = open(path, "w", newline="")  # noqa: SIM115 - closed in fit()
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        fh.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if resumed else None)
        except ImportError:
            tb = None
            log.warn("tensorboard is not installed: no event files (metrics.csv still written)")
        return (fh, writer), tb

    # ---------------------------------------------------------------- the loop

    def fit(self) -> Path:
        from sarkit.train.engine import all_mean, batch_kwargs
        from sarkit.train.schedule import alpha_at, learning_rate

        o = self.options
        resumed = False
        if o.resume:
            pointer = self.ckpt_dir / "latest"
            if o.resume == "latest" and not pointer.exists():
                log.warn(f"{self.ckpt_dir}: no checkpoint yet; starting from the beginning")
            else:
                folder = self.find_checkpoint(o.resume)
                self.load_checkpoint(folder)
                resumed = True
                if self.main:
                    log.info(f"resumed from {folder} at step {self.step}")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / "model.json", self.config.to_json())
        csv_out, tb = self._open_logs(resumed)
        model_kwargs = {"special_ids": self.special, "mask_id": self.mask_id}
        last_saved = self.step if resumed else -1
        try:
            with log.progress("pretrain", total=self.total_steps) as advance:
                if self.main and self.step:
                    advance(self.step)
                while self.step < self.total_steps and self.epoch < o.epochs:
                    self.sampler.set_epoch(self.epoch, self.batch_in_epoch * o.batch_size)
                    self.dataset.set_epoch(self.epoch)
                    tick = time.perf_counter()
                    for batch in self.loader:
                        if self.step >= self.total_steps:
                            break
                        lr = learning_rate(
                            self.step,
                            self.epoch,
                            o.lr,
                            o.lr_start,
                            o.warmup_steps,
                            o.lr_decay,
                            o.lr_min,
                        )
                        alpha = alpha_at(self.step, o.alpha, self.rampup)
                        self.engine.set_lr(lr)
                        self.momentum.update(self.engine.module, self.engine.gathered)
                        kwargs = batch_kwargs(batch, self.device, torch.float32)
                        out = self.engine.step(
                            dict(kwargs, momentum=self.momentum, alpha=alpha, **model_kwargs)
                        )
                        self.step += 1
                        self.batch_in_epoch += 1
                        n = batch["images"].shape[0] * self.world
                        now = time.perf_counter()
                        rate = n / max(now - tick, 1e-9)
                        tick = now
                        if self.step % o.log_every == 0 or self.step == self.total_steps:
                            self._log(out, lr, alpha, rate, csv_out, tb, advance, all_mean)
                        elif self.main:
                            advance(1)
                        if o.save_every and self.step % o.save_every == 0:
                            self.save_checkpoint()
                            last_saved = self.step
                    else:
                        self.epoch += 1
                        self.batch_in_epoch = 0
                        continue
                    break
            if last_saved != self.step:
                self.save_checkpoint()
            self.export()
        finally:
            if csv_out:
                csv_out[0].close()
            if tb:
                tb.close()
        return self.out

    def _log(self, out, lr, alpha, rate, csv_out, tb, advance, all_mean) -> None:
        values = {k: float(v.detach().float().item()) for k, v in out.items()}
        values = all_mean(values, self.device)
        if not self.main:
            return
        temp = values["temp"]
        row = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": f"{values['loss']:.6f}",
            "itc": f"{values['itc']:.6f}",
            "itm": f"{values['itm']:.6f}",
            "mlm": f"{values['mlm']:.6f}",
            "lr": f"{lr:.3e}",
            "alpha": f"{alpha:.4f}",
            "temp": f"{temp:.5f}",
            "samples_s": f"{rate:.2f}",
        }
        fh, writer = csv_out
        writer.writerow(row)
        fh.flush()
        if tb is not None:
            for key in ("loss", "itc", "itm", "mlm"):
                tb.add_scalar(f"loss/{key}", values[key], self.step)
            tb.add_scalar("lr", lr, self.step)
            tb.add_scalar("samples_per_s", rate, self.step)
        status = (
            f"loss {values['loss']:.3f} itc {values['itc']:.3f} itm {values['itm']:.3f} "
            f"mlm {values['mlm']:.3f} lr {lr:.2e} {rate:.1f} samples/s"
        )
        advance(self.options.log_every if self.step % self.options.log_every == 0 else 1, status)

    # ---------------------------------------------------------------- export

    def export(self) -> None:
        """Final weights (all ranks gather; rank 0 writes), timm vision + HF text towers."""
        from safetensors.torch import save_file

        from sarkit.model.knowlip import save_weights
        from sarkit.model.text import plain_text_tower
        from sarkit.train.engine import barrier

        with self.engine.full_weights() as model:
            if self.main:
                with atomic_path(self.out / "model.safetensors") as tmp:
                    save_weights(model, tmp)
                with atomic_path(self.out / "momentum.safetensors") as tmp:
                    save_weights(self.momentum, tmp)
                exp = self.out / "export"
                exp.mkdir(parents=True, exist_ok=True)
                vision = {
                    k: v.detach().to("cpu", torch.float32, copy=True).contiguous()
                    for k, v in model.vision.state_dict().items()
                }
                with atomic_path(exp / "vision.safetensors") as tmp:
                    save_file(vision, str(tmp))
                write_text(
                    exp / "vision.json",
                    json.dumps(
                        {
                            "timm_name": self.config.vision,
                            "in_chans": 1,
                            "num_classes": 0,
                            "img_size": self.config.image_size,
                        },
                        indent=2,
                    ),
                )
                text_tmp = exp / ".text.partial"
                shutil.rmtree(text_tmp, ignore_errors=True)
                plain_text_tower(model.text, text_tmp, self.codec.tokenizer)
                shutil.rmtree(exp / "text", ignore_errors=True)
                os.replace(text_tmp, exp / "text")
        barrier()


def pretrain(records: list[dict], options: PretrainOptions) -> Path:
    """Train and return the run folder; the process group is torn down cleanly."""
    from sarkit.train.engine import teardown_distributed

    try:
        out = Trainer(records, options).fit()
    except BaseException:
        teardown_distributed(clean=False)
        raise
    teardown_distributed()
    return out
