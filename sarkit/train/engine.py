"""Two engines behind the one loop: plain PyTorch (one process or DDP) and DeepSpeed ZeRO.

An engine owns the wrapped model (a task's ``model``) and the optimiser. It runs one
micro-batch (forward, backward, and the optimiser step at an accumulation boundary), saves
and loads its state, and hands out full (gathered) weights for export. Whatever a task keeps
outside the trained module (KnowLIP's momentum encoders and queues) stays outside it.
``dtype`` is the dtype the engine wants floating inputs in: fp32 for the plain engine (it
autocasts), the engine's own half precision under DeepSpeed bf16/fp16.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sarkit import log
from sarkit.errors import SarkitError, UsageError

DS_PRESETS = {
    "zero1": (1, False),
    "zero2": (2, False),
    "zero3": (3, False),
    "zero2-offload": (2, True),
    "zero3-offload": (3, True),
}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The presets bound DeepSpeed's buffers (its defaults: 5e8-element buckets, 1e9 live
# parameters and optimiser sub-groups, which for ViT-L are GBs per rank beside the model);
# bench/deepspeed_memory.py measures what they save. A JSON config sets its own.
ZERO_BUCKETS = {"reduce_bucket_size": 10_000_000, "allgather_bucket_size": 10_000_000}
ZERO3_LIMITS = {
    "stage3_max_live_parameters": 10_000_000,
    "stage3_max_reuse_distance": 10_000_000,
    "stage3_prefetch_bucket_size": 10_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "sub_group_size": 10_000_000,
}


# ---------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(use_deepspeed: bool) -> tuple[int, int, torch.device]:
    """Join the process group torchrun/deepspeed set up (or a one-process group for DeepSpeed)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if use_deepspeed:
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        for key, value in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
        ):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed = import_deepspeed()
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def teardown_distributed(clean: bool = True) -> None:
    """barrier before destroy: two-process ZeRO-3 on gloo otherwise aborts at exit now and then.

    After a failure there is no barrier (the other ranks may never reach it).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average logged scalars over ranks (one small all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def import_deepspeed() -> Any:
    """DeepSpeed, with its logger moved to stderr: it logs to stdout from import on (the
    accelerator line, config errors), and stdout carries records only."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed
    except ImportError as exc:
        raise UsageError(
            "--deepspeed needs DeepSpeed: pip install 'sarkit[deepspeed]' (or pip install "
            f"deepspeed); a C++ compiler and ninja are needed for its JIT ops ({exc})"
        ) from exc
    from deepspeed.utils import logger

    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (
            sys.stdout,
            sys.__stdout__,
        ):
            handler.setStream(sys.stderr)
    return deepspeed


TEXT_PREFIXES = ("text.", "decoder.")


def param_groups(
    model: torch.nn.Module, weight_decay: float, text_lr_scale: float = 1.0
) -> list[dict]:
    """No weight decay on biases, norms, embeddings' position/class tokens and temperature;
    the text tower and decoder (pretrained BERT weights) may learn at a smaller rate
    (`lr_scale`, which `set_lr` applies), so a random vision tower's early gradients do not
    wash out what BERT knows."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "temp"))
        text = name.startswith(TEXT_PREFIXES)
        groups.setdefault((skip, text), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if skip else weight_decay,
            "lr_scale": text_lr_scale if text else 1.0,
        }
        for (skip, text), params in sorted(groups.items())
    ]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr for every group, times the group's `lr_scale` (see param_groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """torch AdamW, fused where torch has it (on the CPU it is several times faster)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


# ---------------------------------------------------------------- plain PyTorch


class PlainEngine:
    """AdamW on the module itself, wrapped in DDP when there are several processes."""

    name = "pytorch"
    dtype = torch.float32  # inputs stay fp32; autocast picks the precision per op

    def __init__(self, task: Any, options: Any, device: torch.device, world: int):
        model = task.model
        self.module = model.to(device)
        self.device = device
        self.autocast_dtype = PRECISIONS[options.precision]
        self.grad_accum = int(getattr(options, "grad_accum", 1))
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        else:
            self.model = model
        self.optimizer = adamw(task.param_groups(options.weight_decay), options.lr_start)
        self.scaler = torch.amp.GradScaler(device.type) if options.precision == "fp16" else None

    def autocast(self):
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def micro_step(self, kwargs: dict, boundary: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; the optimiser steps at a boundary."""
        sync = boundary or not hasattr(self.model, "no_sync")
        with contextlib.nullcontext() if sync else self.model.no_sync():
            with self.autocast():
                out = self.model(**kwargs)
            loss = out["loss"] / self.grad_accum
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        if boundary:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def gathered(self, params: list) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @torch.no_grad()
    def clamp_parameter(self, param: torch.nn.Parameter, lo: float, hi: float) -> None:
        param.clamp_(lo, hi)

    def full_weights(self) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
        """(name -> (dtype, shape), the fp32 weights one at a time) for a weights file."""
        from sarkit.model.weights import saved_dtype, saved_tensors

        pairs = saved_tensors(self.module)
        specs = {name: (saved_dtype(t), tuple(t.shape)) for name, t in pairs}
        return specs, ((name, t.detach().to(saved_dtype(t))) for name, t in pairs)

    def save(self, folder: Path, rank: int) -> None:
        from sarkit.model.weights import save_weights

        if rank == 0:
            save_weights(self.module, folder / "model.safetensors")
            state = {"optimizer": self.optimizer.state_dict()}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, folder / "optimizer.pt")

    def load(self, folder: Path, state: dict, scratch: Path) -> None:
        """Resume from `folder` (whole state on rank 0's files: any world size reads it)."""
        from sarkit.model.weights import load_weights

        load_weights(self.module, folder / "model.safetensors", self.device)
        path = folder / "optimizer.pt"
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except FileNotFoundError:
            raise SarkitError(f"{path}: missing from the checkpoint") from None
        except Exception as exc:
            raise SarkitError(
                f"{path}: not readable ({type(exc).__name__}); the checkpoint is damaged: "
                "resume from another one (--resume DIR)"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


# ---------------------------------------------------------------- DeepSpeed


def deepspeed_config(spec: str, options: Any) -> dict:
    """A DeepSpeed config from a preset name or a JSON file; batch and precision filled in."""
    if spec in DS_PRESETS:
        stage, offload = DS_PRESETS[spec]
        zero: dict[str, Any] = {"stage": stage, **ZERO_BUCKETS}
        if stage == 3:
            zero.update(ZERO3_LIMITS)
        if offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
            if stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config: dict[str, Any] = {"zero_optimization": zero}
    else:
        path = Path(spec)
        if not path.exists():
            known = ", ".join(DS_PRESETS)
            raise UsageError(f"--deepspeed {spec}: neither a preset ({known}) nor a JSON file")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SarkitError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    config.setdefault("train_micro_batch_size_per_gpu", options.batch_size)
    config.setdefault("gradient_accumulation_steps", int(getattr(options, "grad_accum", 1)))
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    if options.precision == "bf16":
        config.setdefault("bf16", {"enabled": True})
    elif options.precision == "fp16":
        config.setdefault("fp16", {"enabled": True, "initial_scale_power": 16})
    return config


# What DeepSpeed's own checkpoint files hold beyond tensors, numbers and containers
DS_CHECKPOINT_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def _ds_types() -> list:
    import importlib

    found = []
    for dotted in DS_CHECKPOINT_TYPES:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


def read_safely(path: Any, map_location: Any = None, loader: Any = None, **kwargs: Any) -> Any:
    """``torch.load(weights_only=True)`` that also builds DeepSpeed's few bookkeeping types
    (``DS_CHECKPOINT_TYPES``); anything else is refused in one line naming the file.
    `loader` is torch's own load where ``torch.load`` is patched to call this."""
    try:
        with torch.serialization.safe_globals(_ds_types()):
            load = loader or torch.load
            return load(path, map_location=map_location, weights_only=True, **kwargs)
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln]
        if lines:
            why = f"holds more than tensors and values ({lines[0]})"
        else:
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            why = f"damaged or not a checkpoint file ({type(exc).__name__}: {first})"
        raise SarkitError(f"{path}: not read: {why}") from None


def safe_checkpoint_reads(engine: Any) -> None:
    """Make DeepSpeed read its checkpoint files with ``torch.load(weights_only=True)``.

    Its stock reader unpickles them whole (``weights_only=False``), so a doctored file in a
    run folder would run code on resume. The safe reader builds tensors, numbers, strings,
    containers and the few DeepSpeed bookkeeping types it writes itself; anything else is
    refused with an error.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    stock = getattr(engine, "checkpoint_engine", None)
    if type(stock) is not TorchCheckpointEngine:  # another engine the user configured
        return

    def load(path: str, map_location=None):
        # mmap: the tensors stay file pages until used; the optimiser then adopts them in
        # place of the states it had, rather than holding both in memory
        return read_safely(path, map_location, mmap=True)

    stock.load = load


class DeepSpeedEngine:
    """deepspeed.initialize with a torch AdamW (no fused_adam JIT) unless it offloads."""

    name = "deepspeed"

    def __init__(self, task: Any, options: Any, device: torch.device, world: int):
        deepspeed = import_deepspeed()
        # torch deprecates the collectives DeepSpeed calls; said once per call otherwise
        warnings.filterwarnings(
            "ignore", r".*torch\.distributed\.\w+` is deprecated", FutureWarning
        )
        model = task.model
        self.config = deepspeed_config(options.deepspeed, options)
        if self.config.get("gradient_accumulation_steps") != getattr(options, "grad_accum", 1):
            raise UsageError(
                f"--deepspeed {options.deepspeed}: its gradient_accumulation_steps "
                f"({self.config.get('gradient_accumulation_steps')}) differs from --grad-accum "
                f"{getattr(options, 'grad_accum', 1)}; set one of them"
            )
        check_half_precision(self.config)
        zero = self.config.get("zero_optimization", {})
        self.stage = int(zero.get("stage", 0))
        groups = task.param_groups(options.weight_decay)
        offload = "offload_optimizer" in zero or "offload_param" in zero
        if "optimizer" in self.config:
            optimizer = None
            model_parameters = groups
        elif offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=options.lr_start, adamw_mode=True)
            model_parameters = None
        else:
            optimizer = adamw(groups, options.lr_start)
            model_parameters = None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=model_parameters, config=self.config
        )
        self.module = self.engine.module
        self.device = device
        safe_checkpoint_reads(self.engine)
        if self.config.get("bf16", {}).get("enabled"):
            self.dtype = torch.bfloat16
        elif self.config.get("fp16", {}).get("enabled"):
            self.dtype = torch.float16
        else:
            self.dtype = torch.float32

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def checkpoint_facts(self) -> dict:
        """What a resume needs to know of a checkpoint, kept in its state.json."""
        return {"zero_stage": self.stage}

    def micro_step(self, kwargs: dict, boundary: bool) -> dict[str, torch.Tensor]:
        """DeepSpeed counts micro-batches itself; its boundary must be the loop's."""
        out = self.engine(**kwargs)
        if self.engine.is_gradient_accumulation_boundary() != boundary:
            raise RuntimeError("DeepSpeed's accumulation boundary differs from the loop's")
        self.engine.backward(out["loss"])
        self.engine.step()
        return out

    def gathered(self, params: list) -> contextlib.AbstractContextManager:
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    @torch.no_grad()
    def clamp_parameter(self, param: torch.nn.Parameter, lo: float, hi: float) -> None:
        """Clamp the optimiser's fp32 master of `param` in place (and under ZeRO-1/2 the
        module's copy; KnowLIP's forward clamps the copy it computes with).

        Each rank clamps the part of the master it holds: no gather, no collective and no
        read back to the host, where a whole-master gather and compare cost one of each per
        step. ZeRO-3's local-partition API still waits for its reduction stream
        (DeepSpeed's own synchronisation).
        """
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the master
            import torch.distributed as dist
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            local = safe_get_local_fp32_param(param)
            if local is None:
                return
            start = dist.get_rank(group=param.ds_process_group) * local.numel()
            valid = max(0, min(local.numel(), param.ds_numel - start))  # the rest is padding
            local[:valid].clamp_(lo, hi)  # a view of the master, or a copy (offload)
            safe_set_local_fp32_param(param, local)
            return
        mapping = getattr(param, "_hp_mapping", None)  # ZeRO-1/2: the fragment held here
        if mapping is not None:
            mapping.get_hp_fragment().clamp_(lo, hi)
        param.clamp_(lo, hi)

    def full_weights(self) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
        """(name -> (dtype, shape), the optimiser's fp32 master weights one at a time).

        Every rank must run the iterator to its end (each parameter's gather is
        collective); a parameter is gathered only as it is written, so no rank holds the
        whole model at once (ViT-L under ZeRO-3 offload), and a bf16 run exports its fp32
        masters, not their bf16 roundings.
        """
        from sarkit.model.weights import saved_dtype, saved_tensors

        pairs = saved_tensors(self.module)
        specs = {
            name: (saved_dtype(t), tuple(getattr(t, "ds_shape", t.shape))) for name, t in pairs
        }
        return specs, self._gather_each(pairs)

    def _gather_each(self, pairs: list) -> Iterator[tuple[str, torch.Tensor]]:
        from deepspeed.utils import safe_get_full_fp32_param

        from sarkit.model.weights import saved_dtype

        for name, t in pairs:
            full = None
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                full = safe_get_full_fp32_param(t)
            if full is None:
                with self.gathered([t] if isinstance(t, torch.nn.Parameter) else []):
                    full = t.detach().to("cpu", saved_dtype(t), copy=True)
            yield name, full.detach().to("cpu", saved_dtype(t))

    def save(self, folder: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, folder: Path, state: dict, scratch: Path) -> None:
        """Resume from `folder`; one saved by another number of processes is first made a
        universal checkpoint (in `scratch`, by rank 0, removed once every rank has read it)
        that the engine cuts anew for this world size (sarkit.train.universal)."""
        import torch.distributed as dist

        from sarkit.train.universal import convert, safe_torch_load

        saved = int(state.get("world", dist.get_world_size()))
        stage = int(state.get("zero_stage", self.stage))
        if (stage == 3) != (self.stage == 3):  # ZeRO-3 files are laid out otherwise
            raise SarkitError(
                f"{folder}: saved under ZeRO-{stage}, which ZeRO-{self.stage} cannot read: "
                f"resume with a ZeRO-{stage} preset or config"
            )
        if saved == dist.get_world_size():
            self._load(folder, "deepspeed", universal=False)
            return
        target = scratch / f".universal-{folder.name}"
        failed = torch.zeros(1, device=self.device)
        error = None
        if dist.get_rank() == 0:
            log.info(
                f"{folder}: saved by {saved} process(es) under ZeRO-{stage}; converting its "
                f"optimiser state to DeepSpeed's universal format for {dist.get_world_size()}"
            )
            scratch.mkdir(parents=True, exist_ok=True)
            for stale in scratch.glob(".universal-*"):  # left by a run killed while loading
                shutil.rmtree(stale, ignore_errors=True)
            try:
                convert(folder / "deepspeed", target)
            except SarkitError as exc:
                failed += 1
                error = exc
        dist.all_reduce(failed)  # the other ranks must not wait for a folder never made
        if error is not None:
            raise error
        if failed.item():
            raise SarkitError(f"{folder}: rank 0 could not convert it (its error says why)")
        with safe_torch_load():
            self._load(scratch, target.name, universal=True)
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(target, ignore_errors=True)

    def _load(self, folder: Path, tag: str, universal: bool) -> None:
        """DeepSpeed's load of checkpoint `tag` in `folder`, universal or its own format
        (set per load, whatever a user's config file says)."""
        from deepspeed.utils import logger

        self.engine._config.load_universal_checkpoint = universal
        level = logger.level  # a universal load warns that no model-parallel unit was given
        logger.setLevel(logging.ERROR if universal else level)
        try:
            path, _ = self.engine.load_checkpoint(
                str(folder),
                tag=tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        finally:
            self.engine._config.load_universal_checkpoint = False
            logger.setLevel(level)
        if path is None:
            raise SarkitError(f"{folder}: no DeepSpeed checkpoint in it")


def check_half_precision(config: dict) -> None:
    """fp16 under DeepSpeed needs an accelerator that has it (a CPU with AVX512-FP16 does)."""
    if not config.get("fp16", {}).get("enabled"):
        return
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if not accel.is_fp16_supported():
        raise UsageError(
            f"--precision fp16: DeepSpeed's {accel.device_name()} accelerator has no fp16 on "
            "this machine; use bf16 or fp32"
        )


def make_engine(task: Any, options: Any, device: torch.device, world: int):
    """The engine for a task's model: DeepSpeed when ``options.deepspeed`` names a config."""
    if options.deepspeed:
        return DeepSpeedEngine(task, options, device, world)
    return PlainEngine(task, options, device, world)
