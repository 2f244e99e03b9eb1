"""Resume a DeepSpeed ZeRO checkpoint on another number of processes.

ZeRO saves each rank's slice of the optimiser state (fp32 masters, Adam moments), cut for
the world size it ran on, and DeepSpeed will not cut those slices again. Its universal
checkpoint format will: ``ds_to_universal`` gathers every parameter's state whole (one
folder per parameter), and an engine started with ``checkpoint.load_universal`` takes its
own slice of each for the world size it runs on. Clusters lose and gain nodes, so a run
saved on 16 GPUs must go on on 8; here that conversion happens by itself at ``--resume``.

The converter and the universal loader unpickle their files with ``weights_only=False``;
both run here under a ``torch.load`` that reads tensors and plain values only (and
DeepSpeed's few bookkeeping types), as every other checkpoint read in sarkit does.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from sarkit.errors import SarkitError


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Meanwhile ``torch.load`` reads tensors and plain values only, whatever its caller
    asks (``sarkit.train.engine.read_safely``)."""
    from sarkit.train.engine import read_safely

    stock = torch.load

    def load(f, map_location=None, **kwargs):
        kwargs.pop("weights_only", None)
        return read_safely(f, map_location, stock, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = stock


def convert(source: Path, target: Path) -> None:
    """DeepSpeed's checkpoint folder `source` (one tag: model and optimiser files of every
    rank) as a universal checkpoint in `target`, written to a temporary folder and renamed.

    DeepSpeed's converter prints its progress; it is kept and shown only when it fails.
    """
    from deepspeed.checkpoint.ds_to_universal import main, parse_arguments

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # the converter also writes a "latest_universal" file beside its output: keep it in here
    output = partial / "universal"
    argv = [
        "--input_folder", str(source), "--output_folder", str(output),
        "--num_extract_workers", "1", "--num_merge_workers", "1",
        "--inject_missing_state",  # sarkit's checkpoints carry no universal_checkpoint_info
    ]  # fmt: skip
    chatter = io.StringIO()
    try:
        with (
            safe_torch_load(),
            contextlib.redirect_stdout(chatter),
            contextlib.redirect_stderr(chatter),
        ):
            saved_argv, sys.argv = sys.argv, ["ds_to_universal", *argv]
            try:
                main(parse_arguments())
            finally:
                sys.argv = saved_argv
    except SarkitError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except (Exception, SystemExit) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        tail = " | ".join(chatter.getvalue().strip().splitlines()[-2:])
        raise SarkitError(
            f"{source}: DeepSpeed could not convert it for another number of processes "
            f"({type(exc).__name__}: {exc}{'; ' + tail if tail else ''}); resume with the "
            "number of processes that saved it"
        ) from None
    shutil.rmtree(target, ignore_errors=True)
    output.rename(target)
    shutil.rmtree(partial)


def reshard(
    files: list[Path], targets: dict[str, torch.Tensor], numels: dict[str, int], rank: int
) -> None:
    """Fill this rank's ZeRO-3 shards (`targets`, padded flat, as ``ds_tensor``) from the
    shard files another world size wrote (`files` in rank order).

    ZeRO-3 gives rank r of w the elements [r * s, (r + 1) * s) of each flattened parameter,
    s = ceil(numel / w), zero-padded at the end; so the old shards laid end to end are the
    parameter, and each new shard is read from the ones it overlaps.
    """
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        opened = []
        for path in files:
            try:
                opened.append(stack.enter_context(safe_open(str(path), "pt", device="cpu")))
            except Exception as exc:
                raise SarkitError(f"{path}: not a readable safetensors file ({exc})") from None
        for name, t in targets.items():
            numel, size = numels[name], t.numel()
            try:
                old = opened[0].get_slice(name).get_shape()[0]
            except Exception:
                raise SarkitError(
                    f"{files[0]}: has no {name}; it belongs to another model"
                ) from None
            if old * len(opened) < numel:
                raise SarkitError(f"{files[0].parent}: the shards of {name} do not cover it")
            start, end = rank * size, min((rank + 1) * size, numel)
            pieces, j = [], start // old
            while start < end:  # the old shards this one overlaps, in order
                stop = min(end, (j + 1) * old)
                pieces.append(opened[j].get_slice(name)[start - j * old : stop - j * old])
                start, j = stop, j + 1
            flat = torch.cat(pieces) if pieces else t.new_zeros(0)
            with torch.no_grad():
                t.zero_()
                t[: flat.numel()].copy_(flat.to(t.dtype))
