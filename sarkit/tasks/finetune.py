"""The generic fine-tune run and evaluation: any head, through the shared loop.

A head builds its data and model (``prepare``); this module writes config.json and
split.json, trains through ``sarkit.train.loop.Loop`` (so DeepSpeed, precision, gradient
accumulation and ``--resume latest`` work the same for every head), keeps the best and last
weights, and summarises the per-epoch metrics into results.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sarkit import log
from sarkit.atomic import atomic_path, write_text
from sarkit.errors import SarkitError
from sarkit.tasks import runfolder
from sarkit.tasks.options import EvalOptions, FinetuneOptions
from sarkit.train.task import ModuleTask, write_weights


def layer_decay_groups(
    model: nn.Module, weight_decay: float, decay: float, prefix: str = "backbone."
) -> list[dict]:
    """AdamW groups with layer-wise lr decay (BEiT/MAE fine-tuning): the head learns at the
    full rate, ViT block i of L at ``decay ** (L - i)``, the embeddings at ``decay ** (L+1)``.

    No weight decay on biases, norms, position embeddings and class tokens.
    """
    try:  # the ViT may sit deeper than the top level (the detector's net.backbone.vit.)
        blocks = getattr(model.get_submodule(prefix.rstrip(".")), "blocks", None)
    except AttributeError:
        blocks = None
    depth = len(blocks) if blocks is not None else 0
    groups: dict[tuple[bool, int], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(prefix):
            rest = name.removeprefix(prefix)
            if rest.startswith("blocks."):
                layer = int(rest.split(".")[1]) + 1
            elif rest.startswith(("norm.", "fc_norm.", "head")):
                layer = depth + 1
            else:  # patch_embed, cls_token, pos_embed, reg_token
                layer = 0
        else:
            layer = depth + 1
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))
        groups.setdefault((skip, layer), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if skip else weight_decay,
            "lr_scale": decay ** (depth + 1 - layer),
        }
        for (skip, layer), params in sorted(groups.items())
    ]


def _gathered(module: nn.Module):
    """All of a ZeRO-3 module's parameters gathered (a no-op elsewhere)."""
    import contextlib

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _main() -> bool:
    """Rank 0 of a process group, or the only process: the one that writes."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def save_module(module: nn.Module, path: Path) -> None:
    """fp32 weights of `module` as safetensors, atomically (rank 0 writes)."""
    from sarkit.model.weights import save_weights
    from sarkit.train.engine import barrier

    with _gathered(module):
        if _main():
            with atomic_path(path) as tmp:
                save_weights(module, tmp)
    barrier()


def same_on_every_rank(values: dict[str, float]) -> dict[str, float]:
    """Rank 0's metrics on every rank. Each rank measures the whole held-out split (all
    pairs, not a shard: ZeRO-3 forwards need every rank anyway), and the ranks must agree on
    whether an epoch is the best, since saving it is collective; a last-bit difference
    between them must not split that decision."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    box = [values]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class HeadTask(ModuleTask):
    """A head's model on the loop: measures the held-out split after every epoch (eval.csv)
    and keeps the weights of the best epoch by the head's primary metric.

    With ``use_ema(decay)`` (``--ema``) a moving average of the weights is what is measured
    and saved (best and last): a small model's late epochs swing by points, the average
    much less (``sarkit.train.ema``)."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        primary: str,
        measure: Callable[[nn.Module], dict[str, float]] | None,
        out: Path,
        groups: Callable[[float], list[dict]] | None = None,
    ):
        super().__init__(model)
        self.name = name
        self.primary = primary
        self.measure = measure
        self.out = Path(out)
        self.groups = groups
        self.best = float("-inf")
        best_json = self.out / "best.json"
        if best_json.exists():  # a resumed run keeps its best so far
            try:
                self.best = float(json.loads(best_json.read_text())[primary])
            except (ValueError, KeyError, TypeError):
                pass
        self.evaluations = 0
        self.ema: Any = None
        self._stepped = False  # an optimiser step ran since the average last moved
        self._engine: Any = None

    def use_ema(self, decay: float) -> None:
        """Measure and save a moving average of the weights (a copy of the model now)."""
        from sarkit.train.ema import WeightEMA

        self.ema = WeightEMA(self.model, decay)

    def to(self, device: torch.device) -> None:
        if self.ema is not None:
            self.ema.to(device)

    def attach(self, engine: Any) -> None:
        if self.ema is not None and getattr(engine, "stage", 0) == 3:
            raise SarkitError("--ema: not under ZeRO-3 (each rank holds a shard of the weights)")
        self._engine = engine

    def _catch_up(self) -> None:
        """Fold the last optimiser step into the average (the loop has no after-step hook:
        a step is folded in before the next one, a measurement or a checkpoint)."""
        if self.ema is not None and self._stepped:
            self.ema.update(self._engine.module)
            self._stepped = False

    def before_step(self, step: int, engine: Any) -> None:
        if self.ema is not None:
            self._catch_up()
            self._stepped = True

    def extra_state(self) -> dict[str, torch.Tensor]:
        if self.ema is None:
            return {}
        self._catch_up()  # a resumed run must not miss the step saved before it
        return self.ema.state()

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.ema is not None:
            self.ema.load_state(state)

    def param_groups(self, weight_decay: float) -> list[dict]:
        if self.groups is not None:
            return self.groups(weight_decay)
        return super().param_groups(weight_decay)

    @torch.no_grad()
    def evaluate(self, module: nn.Module) -> dict[str, float]:
        if self.measure is None:
            return {}
        if self.ema is not None:
            self._catch_up()
            module = self.ema.module
        values = same_on_every_rank(self.measure(module))
        self.evaluations += 1
        score = values.get(self.primary)
        if score is not None and score > self.best:
            self.best = score
            save_module(module, self.out / "best.safetensors")
            if _main():
                write_text(
                    self.out / "best.json",
                    json.dumps({self.primary: score, "evaluation": self.evaluations}) + "\n",
                )
        return values

    def export(self, out: Path, module: nn.Module, specs: dict, tensors: Any) -> None:
        if self.ema is not None:  # rank 0 only: no collective save_module here
            from sarkit.model.weights import save_weights

            self._catch_up()
            for _ in tensors:  # the engine's gathers run all the same
                pass
            with atomic_path(out / "last.safetensors") as tmp:
                save_weights(self.ema.module, tmp)
        else:
            write_weights(out / "last.safetensors", specs, tensors)
        if not (out / "best.safetensors").exists():  # no evaluation ran: last is all there is
            import shutil

            shutil.copyfile(out / "last.safetensors", out / "best.safetensors")


def check_resume(out: Path, task: str) -> None:
    config = out / "config.json"
    if config.exists():
        found = runfolder.read_json(config, "run config").get("task")
        if found != task:
            raise SarkitError(f"-o {out}: a '{found}' run; resume it with `finetune {found}`")


def run(head: Any, options: FinetuneOptions) -> Path:
    """Prepare, train, summarise; returns the run folder. The process group is torn down."""
    from sarkit.train.engine import teardown_distributed

    try:
        out = train_head(head, options)
    except BaseException:
        teardown_distributed(clean=False)
        raise
    teardown_distributed()
    return out


def train_head(head: Any, options: FinetuneOptions) -> Path:
    """`run` inside a caller's process group (scio's --ablation fine-tunes its arms so):
    the group, if any, stays up."""
    from sarkit.train.loop import Loop

    out = Path(options.output)
    if options.resume:
        check_resume(out, head.name)
    prepared = head.prepare(options)
    if getattr(options, "ema", None):
        prepared.task.use_ema(float(options.ema))
    loop = Loop(prepared.task, prepared.dataset, prepared.collate, options)
    if loop.main:
        runfolder.write_config(out, head.name, options, prepared.config)
        runfolder.write_split(out, prepared.split)
    loop.fit()
    if not loop.main:  # under torchrun rank 0 summarises the run
        return out
    results = runfolder.write_results(out, head.primary)
    if results:
        settled = results["settled"].get(head.primary)
        log.info(
            f"{head.name}: {head.primary} last {results['last'].get(head.primary, 0):.4f}, "
            f"settled {settled:.4f} (mean of the last {results['settled_over']} epochs)"
        )
    return out


def evaluate(head: Any, options: EvalOptions) -> dict:
    """Measure a run with its head; write metrics JSON and figures; return the metrics."""
    config = runfolder.read_config(options.run)
    if config["task"] != head.name:
        raise SarkitError(
            f"{options.run}: a '{config['task']}' run, not '{head.name}' "
            f"(use `sarkit eval {config['task']}`)"
        )
    result = head.evaluate(Path(options.run), options)
    folder = Path(options.figures) if options.figures else Path(options.run) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    drawn = head.figures(result, folder)
    record = {
        "task": head.name,
        "run": str(options.run),
        "data": options.data,
        "weights": options.weights,
        "metrics": result.metrics,
        "figures": [str(p) for p in drawn],
    }
    if result.table:  # the head's extra rows (per-class accuracy, detection counts)
        record["table"] = [[str(k), str(v)] for k, v in result.table]
    write_text(folder / f"{head.name}.json", json.dumps(record, indent=2) + "\n")
    return record
