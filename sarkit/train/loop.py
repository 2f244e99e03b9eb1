"""The one training loop: pretraining, SCIO and every fine-tuning head run through it.

The loop owns the engine (plain PyTorch/DDP or DeepSpeed ZeRO), precision, gradient
accumulation, the learning-rate schedule, checkpoints with ``--resume latest``, CSV and
TensorBoard logs, rich progress and the evaluation pass; the task (``sarkit.train.task``)
owns the step's inputs and whatever else its model needs. Steps count optimiser steps:
with ``grad_accum`` k, k micro-batches make one step (across epoch ends, as DeepSpeed
counts them), and the schedule, ``before_step`` (KnowLIP's EMA), logs and checkpoints go
by steps.

A run folder it writes::

    checkpoints/step-NNNNNNNN/  checkpoints/latest    resumable state (atomic)
    metrics.csv  eval.csv  tb/                        per-step scalars, evaluations

Resuming restores weights, optimiser, the task's extra state (KnowLIP: momentum towers and
queue), the step, every rank's RNG state, and skips the micro-batches already seen in the
epoch, so the resumed loss sequence equals an uninterrupted run's.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from sarkit import log
from sarkit.atomic import write_text
from sarkit.errors import SarkitError
from sarkit.train.options import LoopOptions
from sarkit.train.schedule import Schedule

BASE_COLUMNS = ("step", "epoch", "lr", "samples_s")


def _accumulate(sums: dict[str, Any], out: dict[str, Any]) -> None:
    """Add a micro-batch's outputs to `sums` as detached tensors: read as floats only when
    logged (``_floats``), so a GPU step is not stopped by a host sync per loss."""
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean().double()  # as the floats summed before
        else:
            value = float(value)
        sums[key] = sums[key] + value if key in sums else value


def _floats(sums: dict[str, Any], n: int) -> dict[str, float]:
    """The means of accumulated values, in one device-to-host copy."""
    keys = sorted(sums)
    tensors = [k for k in keys if isinstance(sums[k], torch.Tensor)]
    got = (
        dict(zip(tensors, torch.stack([sums[k].cpu() for k in tensors]).tolist(), strict=True))
        if tensors
        else {}
    )
    return {k: (got[k] if k in got else float(sums[k])) / n for k in keys}


class Loop:
    """Train ``task.model`` on ``dataset``; ``fit`` returns the run folder."""

    def __init__(
        self,
        task: Any,
        dataset: torch.utils.data.Dataset,
        collate: Any,
        options: LoopOptions,
    ):
        from sarkit.train.data import EpochKeyed, EpochSampler
        from sarkit.train.engine import make_engine, setup_distributed

        self.task = task
        self.options = o = options
        self.out = Path(o.output)
        if o.grad_accum < 1:
            raise SarkitError(f"--grad-accum {o.grad_accum}: must be at least 1")
        self.rank, self.world, self.device = setup_distributed(bool(o.deepspeed))
        self.main = self.rank == 0
        self.engine = make_engine(task, o, self.device, self.world)
        task.to(self.device)
        task.attach(self.engine)
        self.dataset = dataset
        # workers live for the whole run (no start-up per epoch); the epoch that seeds
        # augmentation reaches them in each sample's key
        self.sampler = EpochSampler(len(dataset), o.seed, self.rank, self.world, keyed=True)
        self.loader = torch.utils.data.DataLoader(
            EpochKeyed(dataset),
            batch_size=o.batch_size,
            sampler=self.sampler,
            num_workers=o.workers,
            collate_fn=collate,
            persistent_workers=o.workers > 0,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # keep the global RNG untouched: resumes stay exact
            drop_last=False,
        )
        self.micro_per_epoch = math.ceil(self.sampler.per_rank / o.batch_size)
        self.steps_per_epoch = self.micro_per_epoch / o.grad_accum
        self.total_steps = (self.micro_per_epoch * o.epochs) // o.grad_accum
        if self.total_steps == 0:
            raise SarkitError(
                f"--grad-accum {o.grad_accum} x --batch-size {o.batch_size} is more than "
                f"the {o.epochs} epoch(s) of {len(dataset)} samples hold: no optimiser step"
            )
        if o.max_steps is not None:
            self.total_steps = min(self.total_steps, o.max_steps)
        self.schedule = Schedule(
            peak=o.lr,
            start=o.lr_start,
            warmup_steps=o.warmup_steps,
            minimum=o.lr_min,
            kind=o.schedule,
            decay=o.lr_decay,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
        )
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this epoch already trained
        self.evaluated = -1  # the step of the last evaluation pass
        self.columns: list[str] | None = None

    # ---------------------------------------------------------------- checkpoints

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        from sarkit.model.weights import write_tensors
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
        shards = self.task.rank_state()
        if shards:
            write_tensors(tmp / f"task-rank{self.rank}.safetensors", shards)
        if self.main:
            extra = self.task.extra_state()
            if extra:
                write_tensors(tmp / "task.safetensors", extra)  # streamed (ViT-L: 1.3 GB)
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "world": self.world,
                "engine": self.engine.name,
                "batch_size": self.options.batch_size,
                "grad_accum": self.options.grad_accum,
                "seed": self.options.seed,
                "task": self.task.name,
                **(
                    self.engine.checkpoint_facts()
                    if hasattr(self.engine, "checkpoint_facts")
                    else {}
                ),
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

        try:
            state = json.loads((folder / "state.json").read_text())
            step = int(state["step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SarkitError(
                f"{folder / 'state.json'}: damaged checkpoint state ({exc}); "
                "resume from another checkpoint folder (--resume DIR)"
            ) from None
        if state["engine"] != self.engine.name:
            raise SarkitError(
                f"{folder}: saved by the {state['engine']} engine; resume with the same engine"
            )
        self.engine.load(folder, state, self.ckpt_dir)
        extra = folder / "task.safetensors"
        current = extra
        try:
            if extra.exists():
                self.task.load_extra_file(extra, self.device)
            targets = self.task.rank_state()
            if targets:
                current = folder / f"task-rank{self.rank}.safetensors"
                self._load_rank_state(folder, int(state["world"]), targets)
        except SarkitError:
            raise
        except Exception as exc:
            raise SarkitError(f"{current}: not a readable safetensors file ({exc})") from None
        rng_file = folder / f"rng-rank{self.rank}.safetensors"
        if rng_file.exists():
            rng = load_file(str(rng_file))
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step = step
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = self._position(folder, state)
        if self.batch_in_epoch >= self.micro_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _load_rank_state(self, folder: Path, saved: int, targets: dict) -> None:
        """Each rank's shards of the task's split state (ZeRO-3's momentum towers): read
        in place when the world size is the saved one, else cut anew from all the files."""
        from sarkit.model.weights import read_into
        from sarkit.train.universal import reshard

        files = [folder / f"task-rank{r}.safetensors" for r in range(saved)]
        needed = [files[self.rank]] if saved == self.world else files
        for path in needed:
            if not path.exists():
                raise SarkitError(f"{path} is missing: the checkpoint is incomplete")
        if saved == self.world:
            read_into(files[self.rank], targets)
        else:
            reshard(files, targets, self.task.rank_numels(), self.rank)

    def _position(self, folder: Path, state: dict) -> int:
        """This run's micro-batches into the epoch that the checkpoint's position means.

        Rank r of w reads the epoch's permutation at r, r + w, ...; after k micro-batches of
        b on every rank, the first k * b * w samples of the permutation are seen. With
        another number of processes or batch size, the run goes on from the same sample
        when that count divides evenly (a resumed epoch then sees exactly the samples not
        yet seen; losses differ as the batches are grouped differently); otherwise from the
        last whole batch before it (a few samples seen twice), said on stderr.
        """
        k = int(state["batch_in_epoch"])
        world, batch = int(state["world"]), int(state["batch_size"])
        if (world, batch) == (self.world, self.options.batch_size):
            return k
        seen = k * batch * world
        per_batch = self.options.batch_size * self.world
        if self.main:
            again = seen % per_batch
            note = f"; {again} sample(s) of it are seen again" if again else ""
            log.warn(
                f"{folder}: saved with {world} process(es) x batch {batch}, resumed with "
                f"{self.world} x {self.options.batch_size}: the epoch goes on after its "
                f"first {seen - again} samples{note}; the RNG streams of the ranks differ, "
                "so the losses are not an uninterrupted run's"
            )
        return seen // per_batch

    # ---------------------------------------------------------------- logs

    def _open_logs(self, resumed: bool):
        if not self.main:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(
                str(self.out / "tb"), purge_step=self.step + 1 if resumed else None
            )
        except ImportError:
            log.warn("tensorboard is not installed: no event files (metrics.csv still written)")
            return None

    # ---------------------------------------------------------------- the loop

    def resume(self) -> Path | None:
        """The checkpoint folder resumed from (None: a fresh start)."""
        o = self.options
        if not o.resume:
            return None
        pointer = self.ckpt_dir / "latest"
        if o.resume == "latest" and not pointer.exists():
            log.warn(f"{self.ckpt_dir}: no checkpoint yet; starting from the beginning")
            return None
        folder = self.find_checkpoint(o.resume)
        self.load_checkpoint(folder)
        if self.main:
            log.info(f"resumed from {folder} at step {self.step}")
        return folder

    def fit(self) -> Path:
        from sarkit.train.engine import all_mean

        o = self.options
        # every submodule in training mode, whatever it was built in (from_pretrained
        # returns BERT in eval mode): a resumed run must train with the same dropout
        self.engine.module.train()
        source = self.resume()
        resumed = source is not None
        tb = self._open_logs(resumed)
        metrics = CsvLog(self.out / "metrics.csv", self.step if resumed else None, self.main)
        evals = CsvLog(self.out / "eval.csv", self.step if resumed else None, self.main)
        # a checkpoint from another folder (another run's) is saved again in this run's own,
        # so the run folder resumes by itself
        own = resumed and source.resolve().parent == self.ckpt_dir.resolve()
        last_saved = self.step if own else -1
        sums: dict[str, Any] = {}  # this step's outputs, summed over its micro-batches
        micro = 0  # micro-batches in the current optimiser step
        samples = 0
        try:
            with log.progress(o.name, total=self.total_steps) as advance:
                if self.main and self.step:
                    advance(self.step)
                tick = time.perf_counter()
                while self.step < self.total_steps and self.epoch < o.epochs:
                    self.sampler.set_epoch(self.epoch, self.batch_in_epoch * o.batch_size)
                    for batch in self.loader:
                        if micro == 0:
                            lr = self.schedule.at(self.step)
                            self.engine.set_lr(lr)
                            self.task.before_step(self.step, self.engine)
                        kwargs = self.task.inputs(batch, self.device, self.engine.dtype, self.step)
                        boundary = micro + 1 == o.grad_accum
                        out = self.engine.micro_step(kwargs, boundary)
                        _accumulate(sums, out)
                        micro += 1
                        self.batch_in_epoch += 1
                        samples += _batch_size(batch) * self.world
                        if not boundary:
                            continue
                        self.step += 1
                        last, n_last = sums, micro
                        sums, micro = {}, 0
                        if self.step % o.log_every == 0 or self.step == self.total_steps:
                            # a logged row is its step's mean, read now: one host sync per
                            # log line rather than one per loss and micro-batch; samples/s
                            # is over the steps since the last line (a step's own wall time
                            # means little while a GPU runs behind the host)
                            values = all_mean(_floats(last, n_last), self.device)
                            now = time.perf_counter()
                            rate = samples / max(now - tick, 1e-9)
                            tick, samples = now, 0
                            self._log(values, lr, rate, metrics, tb, advance)
                        elif self.main:
                            advance(1)
                        if o.eval_every and self.step % o.eval_every == 0:
                            self._evaluate(evals, tb)
                        if o.save_every and self.step % o.save_every == 0:
                            self.save_checkpoint()
                            last_saved = self.step
                        if self.step >= self.total_steps:
                            if self.batch_in_epoch >= self.micro_per_epoch:
                                self.epoch += 1  # the last step ended an epoch: it counts
                                self.batch_in_epoch = 0
                            break
                    else:
                        self.epoch += 1
                        self.batch_in_epoch = 0
                        if not o.eval_every:
                            self._evaluate(evals, tb)
                        continue
                    break
            if self.evaluated != self.step:
                self._evaluate(evals, tb)  # the final model is always scored
            if last_saved != self.step:
                self.save_checkpoint()
            self.export()
        finally:
            metrics.close()
            evals.close()
            if tb is not None:
                tb.close()
            # persistent workers would live as long as this Loop; scio trains several
            shutdown = getattr(getattr(self.loader, "_iterator", None), "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
                self.loader._iterator = None
        return self.out

    def _log(self, values: dict, lr: float, rate: float, rows: CsvLog, tb, advance) -> None:
        if not self.main:
            return
        row = {
            "step": self.step,
            "epoch": self.epoch,
            "lr": f"{lr:.3e}",
            "samples_s": f"{rate:.2f}",
        }
        row.update({k: f"{v:.6f}" for k, v in sorted(values.items())})
        rows.append(row)
        if tb is not None:
            for key, value in values.items():
                tb.add_scalar(f"train/{key}", value, self.step)
            tb.add_scalar("lr", lr, self.step)
            tb.add_scalar("samples_per_s", rate, self.step)
        shown = " ".join(f"{k} {values[k]:.3f}" for k in sorted(values) if k != "loss")
        status = f"loss {values.get('loss', float('nan')):.3f} {shown} lr {lr:.2e} {rate:.1f}/s"
        advance(self.options.log_every if self.step % self.options.log_every == 0 else 1, status)

    def _evaluate(self, rows: CsvLog, tb) -> None:
        self.evaluated = self.step
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            values = self.task.evaluate(module)
        finally:
            module.train(was_training)
        if not values or not self.main:
            return
        rows.append(
            {"step": self.step, "epoch": self.epoch, **{k: f"{v:.6f}" for k, v in values.items()}}
        )
        if tb is not None:
            for key, value in values.items():
                tb.add_scalar(f"eval/{key}", value, self.step)
        log.info(f"step {self.step}: " + " ".join(f"{k} {v:.4f}" for k, v in values.items()))

    def export(self) -> None:
        """Final weights: all ranks gather (a parameter at a time), rank 0 has the task write."""
        from sarkit.train.engine import barrier

        specs, tensors = self.engine.full_weights()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.task.export(self.out, self.engine.module, specs, tensors)
        for _ in tensors:  # every rank takes part in every gather, the task's or not
            pass
        self.task.export_all_ranks(self.out, self.main)
        barrier()


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
    return len(batch)


class CsvLog:
    """A CSV of per-step rows, appended and flushed as they come (rank 0 only).

    The columns are the first row's; a resumed run keeps the rows up to its restored step
    (``keep_upto``) and drops the rest, which the resumed run writes again.
    """

    def __init__(self, path: Path, keep_upto: int | None, enabled: bool = True):
        self.path = path
        self.fh = None
        self.writer: csv.DictWriter | None = None
        self.kept: list[dict] = []
        if enabled and keep_upto is not None and path.exists():
            with open(path, newline="") as fh:
                self.kept = [r for r in csv.DictReader(fh) if int(r["step"]) <= keep_upto]
        self.enabled = enabled
        if enabled and (self.kept or path.exists()):
            self._open(list(self.kept[0]) if self.kept else None)

    def _open(self, columns: list[str] | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "w", newline="")  # noqa: SIM115 - closed in close()
        if columns is None:
            return
        self.writer = csv.DictWriter(self.fh, fieldnames=columns, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(self.kept)
        self.fh.flush()

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.fh is None:
            self._open(None)
        if self.writer is None:
            self.writer = csv.DictWriter(self.fh, fieldnames=list(row), extrasaction="ignore")
            self.writer.writeheader()
        self.writer.writerow(row)
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
