"""`--ablation`: the structure of the paper's Table 8 on held-out clean pairs.

Three arms from the same starting model, each trained for the same two stages after it:
(a) no SCIO: both stages on the original texts; (b) screen + filter: the screening, the
filtered stage (noise pool kept out of MLM/LM), then a stage on the texts with the noise
pool removed (no rewriting); (c) screen + filter + reconstruct: the SCIO run's first round
(its filtered and refined stages; later rounds would give it more steps than the others). Each
is scored by image-text retrieval R@1 both ways on the held-out records (``--heldout``;
a hit is an item of the query's own ``group``, sarkit.train.heldout) and, with
``--ablation-vqa FILE`` (the paper's measure), by VQA accuracy: each arm fine-tuned alike
on the file's train split (the VQA head, ``--ablation-vqa-epochs``/``-lr``) and scored on its
test split with the last epoch's weights, generated answers. Without it the VQA column says
"not measured".
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from sarkit import log
from sarkit.atomic import write_text
from sarkit.errors import SarkitError
from sarkit.launch import launch_rank
from sarkit.scio.options import ScioOptions
from sarkit.scio.records import problem


def retrieval(run: Path, heldout: list[dict], options: ScioOptions) -> dict[str, float]:
    from sarkit.model.knowlip import KnowLIP, run_config
    from sarkit.model.text import TextCodec
    from sarkit.train.data import TileDataset
    from sarkit.train.heldout import HeldOut

    model = KnowLIP.from_run(run).eval()
    config = run_config(run)
    codec = TextCodec.from_pretrained(config.text, config.fields, config.max_tokens)
    base = Path(options.heldout_path).parent if options.heldout_path else None
    ds = TileDataset(heldout, config.image_size, base, None, 0, config.image_mean,
                     config.image_std, config.center_crop)  # fmt: skip
    scores = HeldOut(ds, codec, 64).evaluate(model)
    return {"i2t_r1": scores["val_i2t_r1"], "t2i_r1": scores["val_t2i_r1"]}


def vqa_accuracy(arm: Path, folder: Path, options: ScioOptions) -> dict[str, float]:
    """The arm fine-tuned for VQA in `folder` (resumed if a kill left it half done), scored."""
    from sarkit.tasks.finetune import evaluate, train_head
    from sarkit.tasks.options import EvalOptions, FinetuneOptions
    from sarkit.tasks.vl.heads import VQAHead
    from sarkit.train.engine import barrier

    head = VQAHead()
    if not (folder / "results.json").exists():
        started = (folder / "checkpoints" / "latest").exists()
        tune = FinetuneOptions.for_head(
            head, epochs=options.ablation_vqa_epochs, lr=options.ablation_vqa_lr, output=folder,
            data=options.ablation_vqa, init=str(arm), batch_size=options.batch_size,
            grad_accum=options.grad_accum, precision=options.precision,
            deepspeed=options.deepspeed, workers=options.workers, seed=options.seed,
            save_every=options.save_every, log_every=options.log_every,
            resume="latest" if started else None,
        )  # fmt: skip
        train_head(head, tune)
    metrics: dict[str, float] = {}
    if launch_rank() == 0:
        metrics = evaluate(head, EvalOptions(run=folder, batch_size=options.batch_size))["metrics"]
    barrier()
    return metrics


def run_ablation(records: list[dict], options: ScioOptions) -> dict:
    """Train arms (a) and (b) beside the SCIO run (c), score all three; ablation.md/.json."""
    from sarkit.records import load_all
    from sarkit.scio.driver import layout, plan, read_records
    from sarkit.scio.stagetrain import finish_stage, train_stage

    out = Path(options.output)
    stages = plan(options)
    first_screen = next(n for n, kind, _ in stages if kind == "screen")
    trains = [n for n, kind, _ in stages if kind == "train"]
    start = options.init if trains[0] != "01-train" else str(out / "stages" / "01-train")
    filtered = next(n for n, kind, r in stages if kind == "train" and n.endswith("-r1"))
    refined = next(n for n, kind, r in stages if kind == "train" and n.endswith("-r1b"))
    heldout = [r for r in load_all(options.heldout_path, required=("id", "path")) if r.get("texts")]
    if not heldout:
        raise SarkitError(f"--heldout {options.heldout_path}: no record with texts")
    fields = layout(records, options)
    pool = [copy.deepcopy(r) for r in records if problem(r, fields) is None]
    arms = out / "ablation"
    # (a) no SCIO: two stages on the original texts
    a1, a2 = arms / "a-train-1", arms / "a-train-2"
    for folder, init in ((a1, start), (a2, str(a1))):
        if not (folder / "DONE").exists():
            log.info(f"scio ablation: {folder.name}")
            train_stage(pool, options, init, folder)
            finish_stage(folder, keep_checkpoints=False)
    # (b) screen + filter: the SCIO run's filtered stage, then the noise pool removed
    screened = read_records(out / "stages" / first_screen / "records.jsonl")
    removed = []
    for rec in screened:
        if problem(rec, fields) is not None:
            continue
        rec = copy.deepcopy(rec)
        for name in rec.pop("mlm_exclude", None) or ():
            rec["texts"].pop(name, None)
        removed.append(rec)
    b2 = arms / "b-train-2"
    if not (b2 / "DONE").exists():
        log.info(f"scio ablation: {b2.name}")
        train_stage(removed, options, str(out / "stages" / filtered), b2)
        finish_stage(b2, keep_checkpoints=False)
    rows = [
        ("SCIO off", False, False, a2),
        ("screen + filter", True, False, b2),
        ("screen + filter + reconstruct", True, True, out / "stages" / refined),
    ]
    result = {"heldout": options.heldout_path, "records": len(heldout), "arms": []}
    lines = [
        f"# SCIO ablation (Table 8 structure), {len(heldout)} held-out pairs",
        "",
        "| arm | screen + filter | reconstruct | R@1 image->text | R@1 text->image | VQA |",
        "|---|:---:|:---:|---:|---:|---:|",
    ]
    vqa = {}
    if options.ablation_vqa:  # every arm fine-tuned first: under torchrun all ranks train
        for name, _, _, run in rows:
            log.info(f"scio ablation: VQA fine-tuning of '{name}'")
            folder = arms / f"vqa-{name.replace(' + ', '-').replace(' ', '-').lower()}"
            vqa[name] = vqa_accuracy(run, folder, options)
    for name, sf, rec, run in rows:
        r = retrieval(run, heldout, options)
        arm = {"arm": name, "screen_filter": sf, "reconstruct": rec, **r}
        cell = "not measured"
        if name in vqa:
            arm["vqa"] = vqa[name]
            cell = f"{vqa[name].get('acc_overall', float('nan')):.1f} %"  # vqa_metrics: percent
        result["arms"].append(arm)
        lines.append(f"| {name} | {'yes' if sf else 'no'} | {'yes' if rec else 'no'} | "
                     f"{r['i2t_r1']:.3f} | {r['t2i_r1']:.3f} | {cell} |")  # fmt: skip
    if options.ablation_vqa:
        how = f"{options.ablation_vqa_epochs} epochs at lr {options.ablation_vqa_lr:g}"
        lines += ["", f"VQA: overall accuracy on the test split of {options.ablation_vqa}, each "
                  f"arm fine-tuned {how} (last epoch's weights, generated answers)."]  # fmt: skip
    else:
        lines += ["", "VQA accuracy: not measured (give --ablation-vqa VQA.jsonl)."]
    if launch_rank() == 0:  # under torchrun the VQA scores are rank 0's: it alone writes
        write_text(out / "ablation.md", "\n".join(lines) + "\n")
        write_text(out / "ablation.json", json.dumps(result, indent=2))
    for line in lines:
        log.info(line)
    return result
