"""Benchmark `sarkit pretrain`: samples/s of the tiny and base configs, trainer overhead.

    .venv/bin/python bench/pretrain.py [--configs tiny,base] [--steps 8] [--workers 2]

Both loops train the same model (same seed) on the same batches in this one process:
  bare     a hand-written loop over batches collated beforehand and kept in memory:
           momentum update, forward (ITC + ITM + MLM), backward, fused AdamW step.
  loop     the shared training loop (sarkit.train.loop) on the same records (real MSTAR
           chips from ../shared/data, read and augmented by DataLoader workers, lr
           schedule, logging, CSV, TensorBoard): `sarkit pretrain`'s KnowLIP task, and a
           plain ViT classifier as a fine-tuning head is; samples/s from its per-step
           timings (startup and export excluded).
Overhead = bare samples/s / loop samples/s - 1 (target <= 10%). Beside it, the CPU seconds
per sample of each whole call (user + system, the loop's DataLoader workers included; the
loop pays its start, record table and export there too, the bare loop its collation): on a
shared machine wall-clock rates move with the load, CPU time far less. The first 2 steps of
each loop are warm-up and not counted. With --repeat N the two loops alternate N times and
the medians over all rounds are compared, so a change of load on a shared machine hits
both alike; the load average is printed.

    .venv/bin/python bench/pretrain.py --mfu --device cuda --precision bf16 --configs base-bert

  --mfu    pairs/s and model FLOPs utilisation of the bare loop on synthetic batches (the
           data pipeline is the trainer's business, measured above). FLOPs are counted by
           torch's FlopCounterMode over one whole step (online and momentum towers, ITC,
           ITM on 3x the batch, MLM, backward), so MFU = counted FLOPs x steps/s / peak.
           Peak: --peak-tflops, else (bf16/fp16 only) the dense 16-bit figure of a known
           GPU (H100/H200 989, A100 312). `base-bert` is ViT-B/16 + a BERT-base-shaped
           text tower (12 layers, 768 wide; random init, as no weights download here).
  --compile  torch.compile the four towers (online and momentum, vision and text) in place.
  --tokenizer DIR  base-bert's tokenizer files (vocab.txt, tokenizer.json, ...) from DIR,
           for a machine without the offline MiniLM package (a GPU box: carry them).
  --profile DIR  after the timed steps, 3 more under torch.profiler: a Chrome/Perfetto
           trace per config in DIR (keep it out of the repository), and a table of where a
           step's time goes: the ops with the most self time on the device (CUDA time on a
           GPU, CPU time on the CPU), and the host syncs per step (scalar reads, nonzero,
           stream/device synchronisations; on a GPU also device-to-host copies and the
           kernels launched), which stop the host until the GPU catches up.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SARKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "tests"))

CONFIGS = {
    # name: vision, image size, text layers (None = all 6 of MiniLM), max tokens, batch
    "tiny": ("vit_tiny_patch16_224", 224, None, 128, 16),
    "base": ("vit_base_patch16_224", 224, None, 128, 8),
    "base-bert": ("vit_base_patch16_224", 224, None, 128, 32),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def records(n: int) -> list[dict]:
    from test_pretrain_data import mstar_records

    recs = mstar_records(SHARED / "mstar", "train", None)
    return recs[:n]


def options(name: str, out: Path, steps: int, workers: int, text: str | None = None):
    from sarkit.train.options import PretrainOptions

    vision, size, layers, tokens, batch = CONFIGS[name]
    return PretrainOptions(
        output=out, vision=vision, image_size=size, text_layers=layers, max_tokens=tokens,
        batch_size=batch, epochs=1, max_steps=steps, log_every=1, save_every=0,
        workers=workers, queue_size=20000, warmup_steps=3000, text=text,
    )  # fmt: skip


def bert_base_folder(folder: Path, tokenizer: Path | None = None) -> str:
    """A BERT-base config (transformers' defaults are bert-base-uncased's shape) beside the
    tokenizer files of `tokenizer` (a folder), else of the offline MiniLM, which has the
    same uncased vocabulary (a GPU machine without the MiniLM package needs only its
    tokenizer files, about 1 MB)."""
    import shutil

    from transformers import BertConfig

    from sarkit.model.text import resolve_text_path

    folder.mkdir(parents=True, exist_ok=True)
    BertConfig().save_pretrained(folder)
    src = tokenizer or Path(resolve_text_path(None))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):  # fmt: skip
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return str(folder)


def mfu(
    name: str,
    steps: int,
    device: str,
    precision: str,
    peak: float | None,
    tmp: Path,
    batch: int | None = None,
    compile_towers: bool = False,
    trace: Path | None = None,
    tokenizer: Path | None = None,
):
    """(pairs/s, counted TFLOPs per step, MFU or None, profile lines) of the bare loop on
    synthetic data."""
    from torch.utils.flop_counter import FlopCounterMode

    from sarkit.model.decoder import dec_token_id
    from sarkit.model.knowlip import KnowLIP, Momentum
    from sarkit.model.text import TextCodec
    from sarkit.train.engine import adamw, param_groups
    from sarkit.train.pretrain import model_config

    text = bert_base_folder(tmp / "bert-base", tokenizer) if name == "base-bert" else None
    opts = options(name, tmp / "run", steps, 0, text)
    opts.batch_size = batch or opts.batch_size
    fields = ("Terrain", "Functionality", "Distribution", "Layout", "Boundary", "Buildings",
              "Roads", "Water")  # fmt: skip
    torch.manual_seed(0)
    dev = torch.device(device)
    model = KnowLIP(model_config(opts, fields), pretrained_text=text is None).to(dev)
    model.train()  # as the loop trains it: from_pretrained gives BERT in eval mode (no dropout)
    momentum = Momentum(model, opts.queue_size, opts.momentum).to(dev)
    momentum.copy_from(model)
    if compile_towers:  # in place: parameter names, hence the EMA pairs, stay the same
        for tower in (model.vision, model.text, momentum.vision, momentum.text):
            tower.compile()
    optimizer = adamw(param_groups(model, opts.weight_decay), 1e-4)
    codec = TextCodec.from_pretrained(text, fields, opts.max_tokens)
    b = opts.batch_size
    words = "bright ships moor along the quay beside dark calm water and a long runway".split()
    texts = [{f: " ".join(random.choices(words, k=24)) for f in fields} for _ in range(b)]
    enc = codec.encode(texts)
    ids, mask = enc.input_ids.to(dev), enc.attention_mask.to(dev)
    images = torch.randn(b, 1, opts.image_size, opts.image_size, device=dev)
    tok = codec.tokenizer
    special = [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        momentum.update(model)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = model(images, ids, mask, momentum, 0.4, None, special, tok.mask_token_id,
                        None, dec_token_id(tok))  # fmt: skip
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    per_step = (time.perf_counter() - start) / steps
    if peak is None and dev.type == "cuda" and dtype is not None:  # the table is 16-bit peaks
        gpu = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    util = flops / per_step / (peak * 1e12) if peak else None
    lines = profile(step, dev, 3, trace) if trace is not None else []
    return b / per_step, flops / 1e12, util, lines


SYNC_OPS = (
    "aten::_local_scalar_dense",  # .item(), int(tensor), float(tensor)
    "aten::nonzero",  # boolean indexing, torch.nonzero/where(cond)
    "aten::is_nonzero",  # `if tensor:`
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
)


def profile(step, dev: torch.device, steps: int, trace: Path) -> list[str]:
    """Markdown lines: host syncs and ops per step, the top ops by self device time."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    gpu = dev.type == "cuda"

    def self_us(e) -> float:
        return float(e.self_device_time_total if gpu else e.self_cpu_time_total)

    total = sum(self_us(e) for e in events if not e.key.startswith("ProfilerStep"))
    counts = {e.key: e.count for e in events}
    launches = sum(n for k, n in counts.items() if k.startswith(("cudaLaunchKernel", "cuLaunch")))
    d2h = sum(n for k, n in counts.items() if k.startswith("Memcpy DtoH"))
    lines = [f"trace: {trace}",
             "per step: host syncs "
             + ", ".join(f"{k} {counts.get(k, 0) / steps:g}" for k in SYNC_OPS)
             + (f", device-to-host copies {d2h / steps:g}; kernels launched "
                f"{launches / steps:g}" if gpu else
                " (on the CPU, torch's AdamW reads its step counters with .item(), no sync "
                "there; a GPU's fused AdamW keeps them on the device)"),
             "| op | self time per step (ms) | share | calls per step |",
             "|---|---|---|---|"]  # fmt: skip
    top = sorted((e for e in events if self_us(e) > 0), key=self_us, reverse=True)[:15]
    for e in top:
        lines.append(
            f"| {e.key[:60]} | {self_us(e) / steps / 1e3:.2f} | "
            f"{self_us(e) / max(total, 1e-9) * 100:.1f}% | {e.count / steps:g} |"
        )
    return lines


def bare(recs: list[dict], opts) -> list[float]:
    """samples/s per step of the plain loop."""
    from sarkit.model.decoder import dec_token_id
    from sarkit.model.knowlip import KnowLIP, Momentum
    from sarkit.model.text import TextCodec
    from sarkit.train.data import Augment, ImageTextCollate, TileDataset
    from sarkit.train.engine import adamw, param_groups
    from sarkit.train.pretrain import choose_fields, model_config

    torch.manual_seed(opts.seed)
    fields = choose_fields(recs, None)
    model = KnowLIP(model_config(opts, fields))
    model.train()  # as the loop trains it: from_pretrained gives BERT in eval mode (no dropout)
    momentum = Momentum(model, opts.queue_size, opts.momentum)
    momentum.copy_from(model)
    optimizer = adamw(param_groups(model, opts.weight_decay), 1e-4)
    codec = TextCodec.from_pretrained(None, fields, opts.max_tokens)
    ds = TileDataset(recs, opts.image_size, augment=Augment(), seed=opts.seed)
    collate = ImageTextCollate(recs, codec)
    b = opts.batch_size
    batches = [collate([ds[i] for i in range(k * b, (k + 1) * b)]) for k in range(opts.max_steps)]
    tok = codec.tokenizer
    special = [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]

    def forward(batch: dict) -> dict:
        momentum.update(model)
        return model(batch["images"], batch["input_ids"], batch["attention_mask"], momentum,
                     0.4, batch["mlm_eligible"], special, tok.mask_token_id, batch["groups"],
                     dec_token_id(tok))  # fmt: skip

    return timed_steps(batches, forward, optimizer)


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (DataLoader workers, which
    the loop's epochs end by joining): what a run costs whatever else shares the cores."""
    import resource

    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_steps(batches: list[dict], forward, optimizer) -> list[float]:
    """samples/s of each hand-written step (forward, backward, optimiser step, loss read)."""
    rates = []
    for batch in batches:
        t = time.perf_counter()
        out = forward(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(out["loss"].item())
        rates.append(len(batch["images"]) / (time.perf_counter() - t))
    return rates


def logged_rates(out: Path) -> list[float]:
    with open(out / "metrics.csv", newline="") as fh:
        return [float(r["samples_s"]) for r in csv.DictReader(fh)]


def trainer(recs: list[dict], opts) -> list[float]:
    """samples/s per step of `sarkit pretrain`: the KnowLIP task on the shared loop."""
    from sarkit.train.pretrain import pretrain

    pretrain(recs, opts)
    return logged_rates(Path(opts.output))


class Classifier(torch.nn.Module):
    """A plain ViT classifier, as a fine-tuning head plugs into the loop."""

    def __init__(self, vision: str, size: int, classes: int = 10):
        super().__init__()
        from sarkit.model.vision import build_vision

        self.vit = build_vision(vision, size)
        self.head = torch.nn.Linear(self.vit.num_features, classes)

    def forward(self, images: torch.Tensor, label: torch.Tensor) -> dict:
        logits = self.head(self.vit(images))
        return {"loss": torch.nn.functional.cross_entropy(logits, label)}


def classifier_data(recs: list[dict], opts):
    from sarkit.train.data import Augment, TileDataset

    ds = TileDataset(recs, opts.image_size, augment=Augment(), seed=opts.seed)

    def collate(items):
        return {
            "images": torch.stack([x for x, _ in items]),
            "label": torch.tensor([recs[i]["label"] for _, i in items]),
        }

    return ds, collate


def classifier_bare(recs: list[dict], opts) -> list[float]:
    from sarkit.train.engine import adamw, param_groups

    torch.manual_seed(opts.seed)
    model = Classifier(opts.vision, opts.image_size)
    optimizer = adamw(param_groups(model, opts.weight_decay), 1e-4)
    ds, collate = classifier_data(recs, opts)
    b = opts.batch_size
    batches = [collate([ds[i] for i in range(k * b, (k + 1) * b)]) for k in range(opts.max_steps)]
    return timed_steps(batches, lambda batch: model(**batch), optimizer)


def classifier_loop(recs: list[dict], opts) -> list[float]:
    """The same classifier through the shared loop (DataLoader workers, logs, export)."""
    from sarkit.train.loop import Loop
    from sarkit.train.options import LoopOptions
    from sarkit.train.task import ModuleTask

    torch.manual_seed(opts.seed)
    ds, collate = classifier_data(recs, opts)
    task = ModuleTask(Classifier(opts.vision, opts.image_size))
    Loop(task, ds, collate, LoopOptions.of(opts, name="classify")).fit()
    return logged_rates(Path(opts.output))


def classifier_accelerate(recs: list[dict], opts) -> list[float]:
    """The same classifier in the loop HF Accelerate's documentation shows (prepare, then
    accelerator.backward): what the shared loop would be built on instead."""
    from accelerate import Accelerator

    from sarkit.train.engine import adamw, param_groups

    torch.manual_seed(opts.seed)
    model = Classifier(opts.vision, opts.image_size)
    optimizer = adamw(param_groups(model, opts.weight_decay), 1e-4)
    ds, collate = classifier_data(recs, opts)
    loader = torch.utils.data.DataLoader(ds, batch_size=opts.batch_size, shuffle=True,
                                         num_workers=opts.workers, collate_fn=collate)  # fmt: skip
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    rates, tick = [], time.perf_counter()
    for batch in loader:
        loss = model(**batch)["loss"]
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.item())
        now = time.perf_counter()
        rates.append(len(batch["images"]) / (now - tick))
        tick = now
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="tiny,base")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two loops N times")
    ap.add_argument("--mfu", action="store_true", help="pairs/s and MFU of the bare loop")
    ap.add_argument(
        "--no-classifier", dest="classifier", action="store_false",
        help="skip the plain ViT classifier (bare loop vs the shared loop)",
    )  # fmt: skip
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--peak-tflops", type=float, help="the device's dense peak for MFU")
    ap.add_argument("--batch", type=int, help="--mfu: batch size instead of the config's")
    ap.add_argument("--compile", action="store_true", help="--mfu: torch.compile the towers")
    ap.add_argument("--profile", type=Path, help="--mfu: a profile of 3 steps, traces in DIR")
    ap.add_argument("--tokenizer", type=Path, help="base-bert: tokenizer files from DIR")
    args = ap.parse_args()
    from sarkit import log

    log.configure(quiet=True)
    random.seed(0)
    if args.mfu:
        name_dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        print(f"torch {torch.__version__}, {name_dev}, {args.precision}, image 224, "
              f"max tokens 128, {args.steps} timed steps after 3 untimed"
              + (", towers compiled" if args.compile else ""))  # fmt: skip
        print("| config | batch | pairs/s | TFLOPs per step (counted) | MFU |")
        print("|---|---|---|---|---|")
        profiles = []
        for name in args.configs.split(","):
            batch = args.batch or CONFIGS[name][4]
            trace = None
            if args.profile:
                tag = f"{name}-b{batch}-{args.precision}" + ("-compiled" if args.compile else "")
                trace = args.profile / f"{tag}.json"
            with tempfile.TemporaryDirectory() as tmp:
                pairs, tflops, util, lines = mfu(name, args.steps, args.device, args.precision,
                                                 args.peak_tflops, Path(tmp), args.batch,
                                                 args.compile, trace, args.tokenizer)  # fmt: skip
            shown = f"{util * 100:.1f}%" if util is not None else "n/a (no --peak-tflops)"
            print(f"| {name} | {batch} | {pairs:.1f} | {tflops:.2f} | {shown} |")
            profiles.append((name, batch, lines))
        for name, batch, lines in profiles if args.profile else ():
            print(f"\n{name}, batch {batch}:")
            print("\n".join(lines))
        return
    rows = []
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            opts = options(name, Path(tmp) / "run", args.steps, args.workers)
            recs = records(opts.batch_size * args.steps)
            pairs = [("KnowLIP", bare, trainer)]
            if args.classifier:
                pairs.append(("classifier", classifier_bare, classifier_loop))
                try:
                    import accelerate  # noqa: F401 - optional, measured when installed

                    pairs.append(("classifier, HF Accelerate", classifier_bare,
                                  classifier_accelerate))  # fmt: skip
                except ImportError:
                    print("# accelerate not installed: its row is left out", file=sys.stderr)
            for label, run_bare, run_loop in pairs:
                got_bare, got_loop, cpu_bare, cpu_loop = [], [], 0.0, 0.0
                for k in range(args.repeat):
                    opts.output = Path(tmp) / f"{label}-{k}"
                    t = cpu_seconds()
                    got_bare += run_bare(recs, opts)[2:]
                    cpu_bare += cpu_seconds() - t
                    t = cpu_seconds()
                    got_loop += run_loop(recs, opts)[2:]
                    cpu_loop += cpu_seconds() - t
                samples = opts.batch_size * args.steps * args.repeat
                rows.append((f"{name} {label}", opts.batch_size, statistics.median(got_bare),
                             statistics.median(got_loop), cpu_bare / samples,
                             cpu_loop / samples))  # fmt: skip
        print(f"# {name} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32, "
          f"image 224, max tokens 128, {args.steps} steps x {args.repeat} "
          "(median of steps 3..)")  # fmt: skip
    print("| config | batch | bare samples/s | shared loop samples/s | loop overhead (wall) "
          "| bare CPU s/sample | loop CPU s/sample | loop overhead (CPU) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, batch, rb, rt, cb, ct in rows:
        print(f"| {name} | {batch} | {rb:.2f} | {rt:.2f} | {(rb / rt - 1) * 100:+.1f}% "
              f"| {cb:.3f} | {ct:.3f} | {(ct / cb - 1) * 100:+.1f}% |")  # fmt: skip
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
