"""Vision-language metrics: retrieval Recall@K, caption metrics (pycocoevalcap), VQA accuracy.

* Recall@K both ways as BLIP's ``itm_eval`` counts them: an image is found at rank r when
  the best-ranked of its texts is r; a text when its image is. Means: of the three Ks per
  direction, and of both directions.
* Captions: BLEU-4, METEOR (Java), ROUGE-L and CIDEr from pycocoevalcap after its PTB
  tokeniser; SPICE needs the Stanford jars (``spice_jars``): without them it is reported
  unavailable (``None`` with the reason), never as zero.
* VQA: exact match after normalisation (case, punctuation, articles, spaces); counts compare
  as numbers ("two" = "2"); a list answer ("urban, water") compares as a set. A question
  without a prediction counts as wrong and is counted as ``unanswered``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sarkit.errors import SarkitError

KS = (1, 5, 10)


# ---------------------------------------------------------------- retrieval


def recall_at_k(
    scores_i2t: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Recall@K in percent from an (images x texts) score matrix (higher = better match).

    ``img2txt[i]`` lists the texts of image i; ``txt2img[t]`` is the image of text t.
    Ties rank in index order (a stable sort), as BLIP's argsort does.
    """
    s = np.asarray(scores_i2t, dtype=np.float64)
    n_img, n_txt = s.shape
    if n_img != len(img2txt) or n_txt != len(txt2img):
        raise ValueError(f"scores {s.shape} for {len(img2txt)} images, {len(txt2img)} texts")
    order = np.argsort(-s, axis=1, kind="stable")
    pos = np.empty_like(order)
    pos[np.arange(n_img)[:, None], order] = np.arange(n_txt)[None, :]
    rank_i = np.array([pos[i, list(t)].min() for i, t in enumerate(img2txt)])
    order_t = np.argsort(-s.T, axis=1, kind="stable")
    rank_t = np.array([np.where(order_t[t] == txt2img[t])[0][0] for t in range(n_txt)])
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((rank_i < k).mean())
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float((rank_t < k).mean())
    out["i2t_mean"] = float(np.mean([out[f"i2t_r{k}"] for k in ks]))
    out["t2i_mean"] = float(np.mean([out[f"t2i_r{k}"] for k in ks]))
    out["r_mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2
    return out


# ---------------------------------------------------------------- captions


def caption_scores(
    references: Mapping[str, Sequence[str]],
    candidates: Mapping[str, str],
    meteor: bool = True,
    spice_jars: Path | None = None,
    meteor_scorer: Any = None,
) -> dict[str, float | None]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) of one candidate per id vs references.

    ``meteor_scorer``: a pycocoevalcap ``Meteor`` to reuse (its Java start and paraphrase
    tables cost seconds), else one is started and closed for the call when ``meteor``.

    Every id of ``references`` must have a non-empty candidate: an empty one is an error
    naming the id (a caller that wants to score a failed generation passes its text).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(references)
    if not ids:
        raise SarkitError("no captions to score")
    missing = [i for i in ids if not str(candidates.get(i) or "").strip()]
    if missing:
        raise SarkitError(
            f"{len(missing)} image(s) without a generated caption (first: {missing[0]})"
        )
    empty_refs = [i for i in ids if not any(str(r).strip() for r in references[i])]
    if empty_refs:
        raise SarkitError(
            f"{len(empty_refs)} image(s) without reference captions (first: {empty_refs[0]})"
        )
    # one tokeniser run (one Java start) for references and candidates: PTB tokenises line
    # by line, so this equals tokenising them apart
    both = {("ref", i): [{"caption": str(r)} for r in references[i]] for i in ids}
    both.update({("cand", i): [{"caption": str(candidates[i])}] for i in ids})
    tokenised = PTBTokenizer().tokenize(both)
    gts = {i: tokenised[("ref", i)] for i in ids}
    res = {i: tokenised[("cand", i)] for i in ids}
    out: dict[str, float | None] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, start=1):
        out[f"bleu{n}"] = float(b)
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    if meteor_scorer is not None:
        out["meteor"] = float(meteor_scorer.compute_score(gts, res)[0])
    elif meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            _close_meteor(scorer)
    out["spice"] = spice(gts, res, spice_jars) if spice_jars else None
    return out


def _close_meteor(scorer) -> None:
    """pycocoevalcap's Meteor leaves its Java process running until garbage collection."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is None:
        return
    try:
        with scorer.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()
    except Exception:  # already gone
        pass


SPICE_UNAVAILABLE = "unavailable: SPICE needs the Stanford CoreNLP jars (--spice-jars DIR)"


def spice(gts: dict, res: dict, jars: Path) -> float:
    """SPICE through ``DIR/spice-1.0.jar`` (its ``lib/`` holding Stanford CoreNLP 3.6.0).

    The same protocol as pycocoevalcap's wrapper, which would download the jars itself.
    """
    jar = Path(jars) / "spice-1.0.jar"
    if not jar.is_file():
        raise SarkitError(f"--spice-jars {jars}: no spice-1.0.jar there")
    if shutil.which("java") is None:
        raise SarkitError("SPICE needs Java on PATH")
    data = [{"image_id": i, "test": res[i][0], "refs": list(gts[i])} for i in sorted(gts, key=str)]
    with tempfile.TemporaryDirectory(prefix="sarkit-spice-") as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(data))
        cmd = ["java", "-jar", "-Xmx8G", str(jar), str(src), "-out", str(dst), "-subset", "-silent"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=jar.parent)
        if proc.returncode != 0 or not dst.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SarkitError(f"SPICE failed ({jar}): {tail[0]}")
        scores = json.loads(dst.read_text())
    return float(np.mean([float(s["scores"]["All"]["f"]) for s in scores]))


# ---------------------------------------------------------------- VQA

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve".split()
    )
}
_NUMBER_WORDS["no"] = 0
_NUMBER_WORDS["none"] = 0


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces (kept inside numbers), no articles, single spaces."""
    t = str(text).lower().strip()
    t = re.sub(r"(?<!\d)[.](?!\d)|[^\w\s.,]", " ", t)
    words = [w for w in re.split(r"[\s]+", t.replace(",", " , ")) if w and w not in _ARTICLES]
    return " ".join(words).replace(" ,", ",").strip(" ,.")


def as_number(text: str) -> float | None:
    t = normalise(text)
    if t in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[t])
    m = re.fullmatch(r"(?:region\s+)?(-?\d+(?:\.\d+)?)", t)
    return float(m.group(1)) if m else None


def as_set(text: str) -> frozenset[str]:
    parts = re.split(r",|\band\b", normalise(text))
    return frozenset(p.strip() for p in parts if p.strip())


NUMERIC_TYPES = ("count", "position")
LIST_TYPES = ("all_landforms",)


def answer_matches(prediction: str, answer: str, qtype: str) -> bool:
    if qtype in NUMERIC_TYPES:
        a, p = as_number(answer), as_number(prediction)
        if a is not None:
            return p is not None and p == a
    if qtype in LIST_TYPES:
        return as_set(prediction) == as_set(answer)
    return normalise(prediction) == normalise(answer)


def vqa_accuracy(items: Sequence[Mapping]) -> dict[str, float]:
    """Accuracy in percent per question type and overall from rows with ``type``,
    ``answer`` and ``prediction`` (None or empty: unanswered, counted as wrong)."""
    if not items:
        raise SarkitError("no questions to score")
    per: dict[str, list[bool]] = {}
    unanswered = 0
    for it in items:
        pred = it.get("prediction")
        ok = False
        if pred is None or not str(pred).strip():
            unanswered += 1
        else:
            ok = answer_matches(str(pred), str(it["answer"]), str(it["type"]))
        per.setdefault(str(it["type"]), []).append(ok)
    out = {f"acc_{t}": 100.0 * float(np.mean(v)) for t, v in sorted(per.items())}
    out["acc_overall"] = 100.0 * float(np.mean([x for v in per.values() for x in v]))
    out["questions"] = float(len(items))
    out["unanswered"] = float(unanswered)
    return out
