"""Screening speed: batched (one image encoding + its 17 text variants in two batches, long
and short rows) against a naive loop (one text variant per forward pass, the image
re-encoded each time).

Both compute the same dITC, dITM and aITC (tests/test_scio.py checks they agree); the
model's weights do not matter for speed, so it is built at random. Images: real MSTAR chips
with label-built texts.

    python bench/scio.py [--vision vit_tiny_patch16_224] [--image-size 64] [--images 32]
                         [--text minilm|bert-base]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    from test_pretrain_data import mstar_records

    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig, Momentum
    from sarkit.model.text import TextCodec
    from sarkit.scio.screen import Scorer, queue_bank, screen_images, screen_naive
    from sarkit.train.data import TileDataset

    ap = argparse.ArgumentParser()
    ap.add_argument("--vision", default="vit_tiny_patch16_224")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument(
        "--text",
        choices=("minilm", "bert-base"),
        default="minilm",
        help="the offline MiniLM (6 x 384) or a BERT-base-shaped tower (12 x 768)",
    )
    ap.add_argument("--text-layers", type=int, default=None, help="default: all 6 of MiniLM")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="images per batched screening call")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    text = None
    if a.text == "bert-base":
        from pretrain import bert_base_folder

        folder = tempfile.TemporaryDirectory(prefix="bench-scio-")  # removed at exit
        text = bert_base_folder(Path(folder.name) / "bert-base")
    cfg = KnowLIPConfig(vision=a.vision, image_size=a.image_size, text=text,
                        text_layers=a.text_layers, queue_size=1024,
                        max_tokens=a.max_tokens)  # fmt: skip
    model = KnowLIP(cfg, pretrained_text=text is None).eval()
    momentum = Momentum(model, cfg.queue_size, cfg.momentum)
    feats = torch.nn.functional.normalize(torch.randn(2 * cfg.queue_size, cfg.embed_dim), dim=-1)
    momentum.enqueue(feats[: cfg.queue_size], feats[cfg.queue_size :],
                     torch.arange(cfg.queue_size))  # fmt: skip
    codec = TextCodec.from_pretrained(None, cfg.fields, cfg.max_tokens)
    scorer = Scorer(model, codec, queue_bank(momentum), torch.device("cpu"))
    recs = mstar_records(SHARED / "mstar", "train", max(1, a.images // 10 + 1))[: a.images]
    ds = TileDataset(recs, a.image_size)
    images = torch.stack([ds[i][0] for i in range(len(recs))])
    segs = [codec.segments(r["texts"]) for r in recs]
    groups = -1 - torch.arange(len(recs))

    def batched() -> None:
        for s in range(0, len(recs), a.batch):
            screen_images(scorer, images[s : s + a.batch], segs[s : s + a.batch],
                          groups[s : s + a.batch])  # fmt: skip

    def naive() -> None:
        screen_naive(scorer, images, segs, groups)

    rows = []
    for name, fn in (("naive (1 variant / pass)", naive), (f"batched ({a.batch} images)", batched)):
        fn()  # warm-up (first-call allocations)
        t0 = time.perf_counter()
        fn()
        rows.append((name, len(recs) / (time.perf_counter() - t0)))
    base = rows[0][1]
    layers = a.text_layers or "all"
    print(f"{a.vision} @ {a.image_size}px, text {a.text}, layers {layers}, "
          f"max tokens {a.max_tokens}, {len(recs)} images x 17 variants, "
          f"{a.threads} threads")  # fmt: skip
    print("| screening | images/s | vs naive |")
    print("|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
