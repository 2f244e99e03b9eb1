"""Benchmark the VL evaluations on the CPU: retrieval (ITC ranking + ITM re-rank) pairs/s and
captions/s (beam 3 against greedy), each against a bare forward of the same model.

    .venv/bin/python bench/vl.py [--images 36] [--k 16] [--image-size 64] [--text-layers 2]

Data: HRSID mini ships (../shared/data) through `finetune build --from`'s builder (5
captions per image); model: a KnowLIP of --vision with the offline MiniLM (random ViT;
speed does not depend on the weights). One process, torch's default threads.

  retrieval  bare      encode every image and caption once (the two towers' forward)
             itc       bare + the similarity matrix and the ranking (k = 0)
             itc+itm   itc + ITM re-scoring of the top k of every row and column (BLIP)
             pairs/s = images x texts / seconds; "itm pairs" = pairs the ITM head scored
  caption    bare      image tower + one teacher-forced decoder pass over a reference
                       caption (the cost of scoring, not writing, a caption)
             greedy    generation, 1 beam, --max-new tokens (no early stop: min = max)
             beam 3    the same with 3 beams
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SARKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def rows(folder: Path, n: int) -> list[dict]:
    from sarkit.tasks.vl.annotations import read_annotations
    from sarkit.tasks.vl.build import BuildOptions, build
    from sarkit.tasks.vl.data import load_jsonl

    hrsid = SHARED / "hrsid_mini"
    if not hrsid.exists():
        sys.exit(f"needs the shared data at {hrsid} (set SARKIT_SHARED_DATA)")
    ann = read_annotations(hrsid / "masks", hrsid / "images", "0,255,0=ship", "ship")
    build(ann, BuildOptions(hrsid / "masks", folder, ("retrieval",)))
    return load_jsonl(folder / "retrieval.jsonl")[:n]


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=36)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--vision", default="vit_tiny_patch16_224")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig
    from sarkit.model.text import TextCodec
    from sarkit.tasks.vl.data import Tokens
    from sarkit.tasks.vl.evaluate import encode_gallery, generate_texts, image_batches, itm_rerank

    torch.manual_seed(0)
    config = KnowLIPConfig(
        vision=args.vision,
        image_size=args.image_size,
        text_layers=args.text_layers,
        fields=("caption",),
        max_tokens=35,
        queue_size=0,
    )
    lip = KnowLIP(config).eval()
    codec = TextCodec.from_pretrained(None, ("caption",), 35)
    tokens = Tokens(codec.tokenizer, 64)
    with tempfile.TemporaryDirectory() as tmp:
        data = rows(Path(tmp), args.images)
        base = Path(tmp)
        n_img = len(data)
        n_txt = sum(len(r["captions"]) for r in data)
        state = {}

        def bare():
            with torch.no_grad():
                state["g"] = encode_gallery(lip, codec, data, base)

        def itc():
            bare()
            _, img, _, txt, _, _ = state["g"]
            s = img @ txt.T
            s.argsort(dim=1)
            s.T.argsort(dim=1)

        def itm():
            bare()
            tok, img, enc, txt, _, _ = state["g"]
            state["pairs"] = itm_rerank(lip, tok, enc, (img @ txt.T).float(), args.k)[1]

        print(f"# {args.vision} {args.image_size}px, MiniLM x{args.text_layers} layers, "
              f"{n_img} images x {n_txt} captions, k {args.k}, threads {torch.get_num_threads()}, "
              f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
        t_bare, t_itc, t_itm = (timed(f, args.repeat) for f in (bare, itc, itm))
        pairs = n_img * n_txt
        print("| retrieval | seconds | pairs/s | itm pairs | x bare |")
        print("|---|---|---|---|---|")
        for name, t, extra in (
            ("bare forward", t_bare, 0),
            ("itc ranking", t_itc, 0),
            ("itc + itm re-rank", t_itm, state["pairs"]),
        ):
            print(f"| {name} | {t:.2f} | {pairs / t:.0f} | {extra} | {t / t_bare:.2f} |")

        caps = [r["captions"][0] for r in data]

        def cap_bare():
            from sarkit.model.decoder import lm_inputs, lm_loss

            with torch.no_grad():
                for i, images in image_batches(lip, data, base, 16):
                    states = lip.image_to_text(lip.image_tokens(images))
                    ids, mask, lengths = lm_inputs(
                        None,
                        [tokens.ids(c) for c in caps[i : i + len(images)]],
                        tokens.bos,
                        tokens.eos,
                        tokens.pad,
                    )
                    lm_loss(lip.decoder, ids, mask, states, prefix_lengths=lengths)

        def gen(beams):
            def run():
                generate_texts(
                    lip, tokens, data, base, [""] * n_img, 16, num_beams=beams,
                    max_new_tokens=args.max_new, min_new_tokens=args.max_new,
                )  # fmt: skip

            return run

        t_cb = timed(cap_bare, args.repeat)
        t_g = timed(gen(1), args.repeat)
        t_b = timed(gen(3), args.repeat)
        print()
        print(
            f"| captioning ({args.max_new} new tokens) | seconds | captions/s | x bare | x greedy |"
        )
        print("|---|---|---|---|---|")
        for name, t in (("bare forward", t_cb), ("greedy", t_g), ("beam 3", t_b)):
            print(f"| {name} | {t:.2f} | {n_img / t:.1f} | {t / t_cb:.2f} | {t / t_g:.2f} |")


if __name__ == "__main__":
    main()
