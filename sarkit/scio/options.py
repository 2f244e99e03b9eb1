"""Options of `sarkit scio`: pretrain's model and training options plus SCIO's own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sarkit.train.options import PretrainOptions


@dataclass
class ScioOptions(PretrainOptions):
    """``epochs`` and ``max_steps`` apply to each training stage (the paper: 12 epochs each).

    ``epochs_per_stage_given``: the user asked for stage-1 training although ``init`` gives a
    trained model. ``field_cap``: the largest share of a field's segments one round may flag.
    """

    rounds: int = 1
    epochs_per_stage_given: bool = False
    # 0.1 nats, from bench/scio_noise.py on MSTAR (docs/results.md, SCIO): with the paper's
    # 0, a trained tiny judge flags about as many segments as are corrupted, at precision
    # 0.50 (recall 0.51); 0.1 gives precision 0.77 at recall 0.36. The ITM margin stays 0:
    # a briefly trained ITM head's deltas are ~1e-3 (it sits near its prior) and any
    # margin empties the pool.
    itc_margin: float = 0.1
    itm_margin: float = 0.0
    field_cap: float = 0.3
    screen_batch: int = 16  # images per screening batch (x the text variants of each)
    max_new_tokens: int = 40  # a rewritten segment's own length limit
    screen_only: bool = False
    ablation: bool = False
    heldout_path: str | None = None  # clean held-out pairs for --ablation
    ablation_vqa: str | None = None  # a `finetune build` vqa.jsonl: the arms' VQA column
    ablation_vqa_epochs: int = 3
    ablation_vqa_lr: float = 1e-4
    records_out: Path | None = None  # None: <output>/refined.jsonl; "-" streams to stdout
    name: str = "scio"
