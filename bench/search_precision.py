"""Precision@10 of `sarkit search` for class-name queries on labelled records (MSTAR).

    .venv/bin/python bench/search_precision.py val.jsonl --work W --run pre [--run scio]
        [--random vit_tiny_patch16_224,32,1,256] [--rerank 50] [--queries queries.json]

Each run embeds RECORDS (``id``, ``path``, ``label`` = MSTAR folder index) into
W/<run name>.index through the real `embed`, then `search` asks one query per class,
"<designation> <kind>" ("T72 main battle tank"), k = 10; a hit is right when its label is
the query's class. ``--random VISION,IMAGE_SIZE,TEXT_LAYERS,EMBED_DIM`` adds a random-init
KnowLIP of that shape (random ViT and projections, the offline MiniLM's first layers, pixel
statistics of the records) as a run folder W/random. The random-ranking baseline is each
class's share of the records (the expected precision of a random order). With --rerank N,
the same queries again with the top N re-ranked by ITM.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def random_run(folder: Path, spec: str, records: Path) -> Path:
    import torch

    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig
    from sarkit.model.weights import save_weights
    from sarkit.train.data import pixel_stats

    if (folder / "model.safetensors").exists():  # made by an earlier call: the same model
        return folder
    torch.manual_seed(0)
    vision, size, layers, dim = spec.split(",")
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    mean, std = pixel_stats(rows, records.parent)
    config = KnowLIPConfig(
        vision=vision,
        image_size=int(size),
        text_layers=int(layers),
        embed_dim=int(dim),
        fields=("caption",),
        max_tokens=32,
        queue_size=0,
        image_mean=mean,
        image_std=std,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(config.to_json())
    save_weights(KnowLIP(config), folder / "model.safetensors")
    return folder


def load_queries(path: Path | None) -> list[tuple[object, str]]:
    """(label, text) per query: the file's, else one "<designation> <kind>" per MSTAR class."""
    if path is None:
        from test_pretrain_data import MSTAR_CLASSES

        return [(i, f"{name} {kind}") for i, (name, kind, _) in enumerate(MSTAR_CLASSES)]
    entries = json.loads(path.read_text())
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and {"text", "label"} <= set(e) for e in entries
    ):
        raise SystemExit(f'--queries {path}: expected a JSON list of {{"text": .., "label": ..}}')
    return [(e["label"], str(e["text"])) for e in entries]


def main() -> None:
    from sarkit import log
    from sarkit.report import Report
    from sarkit.search.embed import EmbedOptions, embed
    from sarkit.search.query import SearchOptions, search

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--run", type=Path, action="append", default=[])
    ap.add_argument("--random", default=None)
    ap.add_argument("--rerank", type=int, default=0)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--queries", type=Path, default=None, help="JSON [{text, label}, ...]")
    args = ap.parse_args()
    log.configure(quiet=True)
    runs = list(args.run)
    if args.random:
        runs.insert(0, random_run(args.work / "random", args.random, args.records))
    labels = Counter(
        json.loads(line)["label"] for line in args.records.read_text().splitlines() if line
    )
    total = sum(labels.values())
    queries = load_queries(args.queries)
    table: dict[str, list[float]] = {}
    for run in runs:
        index = args.work / f"{run.name}.index"
        embed(EmbedOptions([str(args.records)], index, run, 64, 2, 4096), Report("embed"))
        for rr in [0] + ([args.rerank] if args.rerank else []):
            col = run.name + (f" +ITM top {rr}" if rr else "")
            table[col] = []
            for label, text in queries:
                hits, _ = search(SearchOptions(index, text, k=args.k, rerank=rr), Report("s"))
                table[col].append(sum(h["label"] == label for h in hits) / args.k)
            print(f"{col}: mean p@{args.k} {sum(table[col]) / len(queries):.3f}", file=sys.stderr)
    names = list(table)
    digits = len(str(args.k)) - 1  # p@10 in tenths, p@100 in hundredths: every hit shows
    print(f"| query | random ranking | {' | '.join(names)} |")
    print("|---|---:|" + "---:|" * len(names))
    for q, (label, text) in enumerate(queries):
        cells = " | ".join(f"{table[n][q]:.{digits}f}" for n in names)
        print(f"| {text} | {labels[label] / total:.3f} | {cells} |")
    means = " | ".join(f"**{sum(table[n]) / len(queries):.3f}**" for n in names)
    chance = sum(labels[label] / total for label, _ in queries) / len(queries)
    print(f"| mean | {chance:.3f} | {means} |")


if __name__ == "__main__":
    main()
