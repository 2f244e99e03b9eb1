"""The vision-language heads: retrieval, caption and vqa (the paper's Table 6, settings of
Table 5), each a ``TaskHead`` registered through ``sarkit_task_heads``.

Every head fine-tunes a KnowLIP from ``--init RUN`` (a sarkit pretrain or SCIO run:
``KnowLIP.from_run``'s folder) or ``random`` through the shared loop, measures its held-out
split after every epoch (eval.csv; the best epoch by ``primary`` is kept), and is measured
again by ``sarkit eval TASK RUN`` on ``--data`` (its ``test`` split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sarkit.errors import SarkitError
from sarkit.hookspecs import HeadOption
from sarkit.ranges import FRACTION


def both(flag: str, help: str, default: Any, type: Any = str, choices=()) -> tuple:
    """The option for `finetune` (with its default) and for `eval` (default: the run's)."""
    return (
        HeadOption(flag, help, default, type, tuple(choices), ("finetune",)),
        HeadOption(flag, f"{help} Default: the run's.", None, type, tuple(choices), ("eval",)),
    )


COMMON_OPTIONS = (
    HeadOption(
        "--text",
        "With --init random: BERT name or folder for the text towers (default: offline "
        "all-MiniLM-L6-v2).",
        modes=("finetune",),
    ),
    HeadOption(
        "--text-layers",
        "With --init random: keep only the first N BERT layers (small test models).",
        type=int,
        modes=("finetune",),
    ),
)


class VLHead:
    """What the three heads share: data reading, the init, the run folder's text config."""

    name = ""
    kind = "images"  # or "vqa": which builder file the head reads
    summary = ""
    primary = ""
    defaults: dict[str, Any] = {}
    options: tuple[HeadOption, ...] = ()

    def rows(self, data: str | Path) -> list[dict]:
        from sarkit.tasks.vl.data import check_rows, load_jsonl

        return check_rows(load_jsonl(data), str(data), self.kind)

    def held_out(self, data: str | Path) -> list[dict]:
        """The rows to measure on: the test split when the file has one, else all rows."""
        rows = self.rows(data)
        if any("split" in r for r in rows):
            held = [r for r in rows if r.get("split") in ("test", "val")]
            if not held:
                raise SarkitError(f"{data}: no record in the test split")
            return held
        return rows

    def start(self, options: Any):
        """(train rows, held-out rows, split, lip, provenance, base folder)."""
        from sarkit.tasks import Split
        from sarkit.tasks.vl.data import build_lip, split_rows

        if not options.data:
            raise SarkitError(
                f"finetune {self.name} needs --data (the builder's {self.name}.jsonl)"
            )
        rows = self.rows(options.data)
        base = Path(options.data).parent
        train, held, how = split_rows(rows, options.val_fraction, options.seed)
        if options.val_data:
            held = self.held_out(options.val_data)
            how = "given"
        if not train:
            raise SarkitError(f"{options.data}: no record in the train split")
        if not held:
            raise SarkitError(
                f"{options.data}: no held-out record (no test split; give --val-data or more "
                "records for the seeded split)"
            )
        key = "image" if self.kind == "vqa" else "id"
        split = Split(
            train=sorted({str(r.get(key, r.get("id"))) for r in train}),
            val=sorted({str(r.get(key, r.get("id"))) for r in held}),
            how="given" if how == "given" else "seeded 4:1",
            seed=None if how == "given" else options.seed,
        )
        lip, provenance = build_lip(options, train, base)
        return train, held, split, lip, provenance, base

    def head_config(self, lip: Any, provenance: dict, options: Any, **more: Any) -> dict:
        from sarkit.tasks.vl.data import model_config_dict

        return {
            "model": model_config_dict(lip),
            "init": provenance,  # as every head's config.json (eval --compare's row label)
            "data": str(Path(options.data).resolve()),  # eval's default, from any folder
            **more,
        }

    def figures(self, result: Any, folder: Path) -> list[Path]:
        return []


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    from sarkit.atomic import atomic_open

    with atomic_open(path, encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _tokens_of(lip: Any, max_tokens: int):
    from transformers import AutoTokenizer

    from sarkit.model.text import resolve_text_path
    from sarkit.tasks.vl.data import Tokens

    return Tokens(AutoTokenizer.from_pretrained(resolve_text_path(lip.config.text)), max_tokens)


# ---------------------------------------------------------------- retrieval


class RetrievalHead(VLHead):
    name = "retrieval"
    summary = (
        "Image-text retrieval: fine-tune ITC + ITM from a run; rank by ITC, re-rank the top "
        "k by ITM (R@1/5/10 both ways and their mean)."
    )
    primary = "r_mean"
    defaults = {
        "lr": 1e-5,
        "epochs": 12,
        "batch_size": 32,
        "warmup_steps": 0,
        "weight_decay": 0.05,
        "schedule": "cosine",
    }
    options = (
        *COMMON_OPTIONS,
        *both("--max-tokens", "Tokens per caption (Table 5: 35).", 35, int),
        *both(
            "--k-test",
            "Candidates re-ranked by ITM per query (BLIP: 128; 0: ITC ranking only).",
            128,
            int,
        ),
        HeadOption(
            "--alpha",
            "Momentum distillation weight.",
            default=0.4,
            type=FRACTION,
            modes=("finetune",),
        ),
        HeadOption(
            "--momentum",
            "EMA factor of the momentum encoders.",
            default=0.995,
            type=FRACTION,
            modes=("finetune",),
        ),
    )

    def prepare(self, options: Any):
        from sarkit.model.knowlip import Momentum
        from sarkit.model.text import TextCodec
        from sarkit.tasks import Prepared
        from sarkit.tasks.vl.data import (
            CAPTION_FIELD,
            PairDataset,
            RetrievalCollate,
            RetrievalModel,
            RetrievalTask,
            save_text_config,
            tile_dataset,
        )
        from sarkit.tasks.vl.evaluate import retrieval_metrics

        train, held, split, lip, provenance, base = self.start(options)
        extra = options.extra
        max_tokens = int(extra.get("max_tokens") or 35)
        codec = TextCodec.from_pretrained(lip.config.text, (CAPTION_FIELD,), max_tokens)
        save_text_config(lip, codec.tokenizer, options.output)
        pairs = [(row, cap) for row in train for cap in row["captions"]]
        tiles = tile_dataset([row for row, _ in pairs], base, lip.config, True, options.seed)
        model = RetrievalModel(lip)
        momentum = Momentum(lip, lip.config.queue_size, float(extra.get("momentum") or 0.995))
        k = int(extra.get("k_test") if extra.get("k_test") is not None else 128)

        def measure(module):
            return retrieval_metrics(module.lip, codec, held, base, k)

        task = RetrievalTask(model, self.name, self.primary, measure, options.output)
        task.momentum = momentum
        task.alpha = float(extra.get("alpha") if extra.get("alpha") is not None else 0.4)
        config = self.head_config(lip, provenance, options, max_tokens=max_tokens, k_test=k)
        return Prepared(
            task, PairDataset(pairs, tiles), RetrievalCollate(pairs, codec), split, config
        )

    def evaluate(self, run: Path, options: Any):
        from sarkit.model.text import TextCodec
        from sarkit.tasks import EvalResult
        from sarkit.tasks.vl.data import CAPTION_FIELD, load_model
        from sarkit.tasks.vl.evaluate import retrieval_metrics

        model, config, _ = load_model(run, options.weights)
        data = options.data or config["data"]
        held = self.held_out(data)
        k = options.extra.get("k_test")
        k = int(config.get("k_test", 128) if k is None else k)
        max_tokens = int(options.extra.get("max_tokens") or config.get("max_tokens", 35))
        codec = TextCodec.from_pretrained(str(Path(run) / "text"), (CAPTION_FIELD,), max_tokens)
        metrics = retrieval_metrics(
            model.lip, codec, held, Path(data).parent, k, options.batch_size
        )
        return EvalResult(metrics)


# ---------------------------------------------------------------- caption


class CaptionHead(VLHead):
    name = "caption"
    summary = (
        "Image captioning: fine-tune the decoder (LM loss, optional prompt); beam search; "
        "BLEU-4, METEOR, ROUGE-L, CIDEr (SPICE with --spice-jars)."
    )
    primary = "cider"
    defaults = {
        "lr": 1e-5,
        "epochs": 5,
        "batch_size": 32,
        "warmup_steps": 0,
        "weight_decay": 0.05,
        "schedule": "cosine",
    }
    options = (
        *COMMON_OPTIONS,
        *both("--max-tokens", "Tokens per caption row (Table 5: 100).", 100, int),
        HeadOption(
            "--prompt",
            "Prompt prefix the decoder continues ('' for none).",
            default="a SAR image of",
            modes=("finetune",),
        ),
        *both("--beams", "Beam width (1: greedy).", 3, int),
        *both("--max-new-tokens", "Longest caption generated.", 30, int),
        HeadOption(
            "--spice-jars",
            "Folder with spice-1.0.jar and its lib/ (Stanford CoreNLP): compute SPICE.",
            modes=("eval",),
        ),
        HeadOption(
            "--no-meteor",
            "Leave METEOR out (it starts Java).",
            default=False,
            type=bool,
            modes=("eval",),
        ),
    )

    def prepare(self, options: Any):
        from sarkit.tasks import Prepared
        from sarkit.tasks.vl.data import (
            DecoderCollate,
            DecoderModel,
            PairDataset,
            save_text_config,
            tile_dataset,
        )
        from sarkit.tasks.vl.evaluate import caption_metrics

        train, held, split, lip, provenance, base = self.start(options)
        extra = options.extra
        tokens = _tokens_of(lip, int(extra.get("max_tokens") or 100))
        save_text_config(lip, tokens.tokenizer, options.output)
        prompt = str(extra.get("prompt") if extra.get("prompt") is not None else "a SAR image of")
        prompt = prompt.strip()
        pairs = [(row, (prompt, cap)) for row in train for cap in row["captions"]]
        tiles = tile_dataset([row for row, _ in pairs], base, lip.config, True, options.seed)
        beams = int(extra.get("beams") or 3)
        max_new = int(extra.get("max_new_tokens") or 30)

        def measure(module):  # no METEOR per epoch: Java costs seconds a call
            return caption_metrics(
                module.lip, tokens, held, base, prompt, beams, max_new, meteor=False
            )

        from sarkit.tasks.finetune import HeadTask

        task = HeadTask(DecoderModel(lip), self.name, self.primary, measure, options.output)
        config = self.head_config(
            lip,
            provenance,
            options,
            prompt=prompt,
            max_tokens=tokens.max_tokens,
            beams=beams,
            max_new_tokens=max_new,
        )
        return Prepared(
            task, PairDataset(pairs, tiles), DecoderCollate(pairs, tokens), split, config
        )

    def evaluate(self, run: Path, options: Any):
        from sarkit.tasks import EvalResult
        from sarkit.tasks.vl.data import Tokens, load_model
        from sarkit.tasks.vl.evaluate import caption_metrics

        extra = options.extra
        jars = extra.get("spice_jars")
        if jars and not (Path(jars) / "spice-1.0.jar").is_file():  # before minutes of decoding
            raise SarkitError(f"--spice-jars {jars}: no spice-1.0.jar there")
        model, config, tokenizer = load_model(run, options.weights)
        data = options.data or config["data"]
        held = self.held_out(data)
        tokens = Tokens(tokenizer, int(extra.get("max_tokens") or config.get("max_tokens", 100)))
        metrics = caption_metrics(
            model.lip,
            tokens,
            held,
            Path(data).parent,
            config.get("prompt", ""),
            int(extra.get("beams") or config.get("beams", 3)),
            int(extra.get("max_new_tokens") or config.get("max_new_tokens", 30)),
            meteor=not extra.get("no_meteor"),
            spice_jars=Path(jars) if jars else None,
            batch=options.batch_size,
            details=True,
        )
        samples = metrics.pop("_samples")
        if metrics.get("spice") is None:
            from sarkit import log
            from sarkit.tasks.vl.metrics import SPICE_UNAVAILABLE

            metrics.pop("spice", None)
            log.info(f"spice  {SPICE_UNAVAILABLE}")
            return EvalResult(metrics, {"spice": SPICE_UNAVAILABLE, "samples": samples})
        return EvalResult(metrics, {"samples": samples})

    def figures(self, result: Any, folder: Path) -> list[Path]:
        """The generated captions beside their references (captions.jsonl)."""
        return [write_jsonl(Path(folder) / "captions.jsonl", result.details.get("samples", []))]


# ---------------------------------------------------------------- vqa

ANSWER_MODES = ("generate", "rank")


class VQAHead(VLHead):
    name = "vqa"
    kind = "vqa"
    summary = (
        "Visual question answering: the decoder answers conditioned on the image and the "
        "question (or ranks the answer vocabulary); accuracy per question type."
    )
    primary = "acc_overall"
    defaults = {
        "lr": 2e-5,
        "epochs": 10,
        "batch_size": 32,
        "warmup_steps": 0,
        "weight_decay": 0.05,
        "schedule": "cosine",
    }
    options = (
        *COMMON_OPTIONS,
        *both("--max-tokens", "Tokens per question + answer row.", 48, int),
        *both(
            "--answer-mode",
            "generate: the decoder writes the answer; rank: the most likely of the "
            "vocabulary's answers of the question's type (answers.json beside the data).",
            "generate",
            str,
            ANSWER_MODES,
        ),
        HeadOption(
            "--llm",
            "Ask an LLM backend of `sarkit caption` instead of a run (no RUN; --data needed): "
            "the Table 7 comparison.",
            modes=("eval",),
        ),
        HeadOption(
            "--base-url", "With --llm: OpenAI-compatible endpoint (.../v1).", modes=("eval",)
        ),
        HeadOption("--model-id", "With --llm: model id sent to the server.", modes=("eval",)),
        HeadOption("--keys-file", 'With --llm: JSON {"openai": KEY}.', modes=("eval",)),
        HeadOption(
            "--limit", "With --llm: ask only the first N test questions.", type=int, modes=("eval",)
        ),
        HeadOption(
            "--concurrency",
            "With --llm: questions in flight.",
            default=4,
            type=int,
            modes=("eval",),
        ),
    )

    def prepare(self, options: Any):
        from sarkit.tasks import Prepared
        from sarkit.tasks.finetune import HeadTask
        from sarkit.tasks.vl.data import (
            DecoderCollate,
            DecoderModel,
            PairDataset,
            save_text_config,
            tile_dataset,
            vocabulary,
        )
        from sarkit.tasks.vl.evaluate import vqa_metrics

        train, held, split, lip, provenance, base = self.start(options)
        extra = options.extra
        tokens = _tokens_of(lip, int(extra.get("max_tokens") or 48))
        save_text_config(lip, tokens.tokenizer, options.output)
        mode = str(extra.get("answer_mode") or "generate")
        vocab = vocabulary(options.data)
        if mode == "rank" and vocab is None:
            raise SarkitError(f"--answer-mode rank: no answers.json beside {options.data}")
        pairs = [(row, (row["question"], row["answer"])) for row in train]
        tiles = tile_dataset([row for row, _ in pairs], base, lip.config, False, options.seed)

        def measure(module):
            return vqa_metrics(module.lip, tokens, held, base, mode, vocab)[0]

        task = HeadTask(DecoderModel(lip), self.name, self.primary, measure, options.output)
        config = self.head_config(
            lip, provenance, options, max_tokens=tokens.max_tokens, answer_mode=mode
        )
        return Prepared(
            task, PairDataset(pairs, tiles), DecoderCollate(pairs, tokens), split, config
        )

    def evaluate(self, run: Path, options: Any):
        from sarkit.tasks import EvalResult
        from sarkit.tasks.vl.data import Tokens, load_model, vocabulary
        from sarkit.tasks.vl.evaluate import vqa_metrics

        model, config, tokenizer = load_model(run, options.weights)
        data = options.data or config["data"]
        held = self.held_out(data)
        extra = options.extra
        mode = str(extra.get("answer_mode") or config.get("answer_mode", "generate"))
        vocab = vocabulary(data)
        if mode == "rank" and vocab is None:
            raise SarkitError(f"--answer-mode rank: no answers.json beside {data}")
        tokens = Tokens(tokenizer, int(extra.get("max_tokens") or config.get("max_tokens", 48)))
        metrics, answers = vqa_metrics(
            model.lip, tokens, held, Path(data).parent, mode, vocab, options.batch_size
        )
        return EvalResult(metrics, {"answers": answers})

    def figures(self, result: Any, folder: Path) -> list[Path]:
        """Every question with its answer and the prediction (answers.jsonl)."""
        return [write_jsonl(Path(folder) / "vqa_answers.jsonl", result.details.get("answers", []))]


def heads() -> list[Any]:
    """The three built-in VL heads (this module imports no torch: --help stays quick)."""
    return [RetrievalHead(), CaptionHead(), VQAHead()]
