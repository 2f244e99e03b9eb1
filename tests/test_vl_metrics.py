"""VL metrics against independent computations: R@K by brute force, caption metrics against
pycocoevalcap run directly, VQA normalisation, MTLD against worked examples; eval text."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import sarkit, shared

from sarkit.tasks.vl.metrics import answer_matches, caption_scores, recall_at_k, vqa_accuracy
from sarkit.tasks.vl.textstats import analyse, distinct, field_stats, mtld


def brute_recall(s, img2txt, txt2img, k):
    """Count, for each query, how many candidates score strictly higher or tie earlier."""
    n_img, n_txt = s.shape
    hit_i = 0
    for i in range(n_img):
        best = min(
            sum(1 for u in range(n_txt) if s[i, u] > s[i, t] or (s[i, u] == s[i, t] and u < t))
            for t in img2txt[i]
        )
        hit_i += best < k
    hit_t = 0
    for t in range(n_txt):
        i = txt2img[t]
        rank = sum(1 for j in range(n_img) if s[j, t] > s[i, t] or (s[j, t] == s[i, t] and j < i))
        hit_t += rank < k
    return 100 * hit_i / n_img, 100 * hit_t / n_txt


def test_recall_at_k_equals_brute_force():
    rng = np.random.default_rng(0)
    n_img, per = 13, 3
    s = rng.normal(size=(n_img, n_img * per))
    s[2, 7] = s[2, 6]  # a tie
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [t // per for t in range(n_img * per)]
    got = recall_at_k(s, img2txt, txt2img)
    for k in (1, 5, 10):
        i2t, t2i = brute_recall(s, img2txt, txt2img, k)
        assert got[f"i2t_r{k}"] == pytest.approx(i2t)
        assert got[f"t2i_r{k}"] == pytest.approx(t2i)
    means = [np.mean([got[f"{d}_r{k}"] for k in (1, 5, 10)]) for d in ("i2t", "t2i")]
    assert got["r_mean"] == pytest.approx(np.mean(means))
    # a perfect matrix: everything at rank 0
    perfect = np.full((3, 3), -1.0) + 2 * np.eye(3)
    assert recall_at_k(perfect, [[0], [1], [2]], [0, 1, 2])["r_mean"] == 100.0


REFS = {
    "a": ["one ship in the upper left region", "a single ship at the upper left of the image"],
    "b": ["two ships near the center", "there are two ships in the center region"],
    "c": ["no target is visible", "the scene shows no target"],
}
CANDS = {"a": "one ship in the upper left", "b": "two ships in the center", "c": "no ship"}


def test_caption_metrics_equal_pycocoevalcap_run_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    meteor = Meteor()  # one Java start for both sides (it loads for seconds)
    ours = caption_scores(REFS, CANDS, meteor_scorer=meteor)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in CANDS.items()})
    bleu = Bleu(4).compute_score(gts, res)[0]
    assert ours["bleu4"] == pytest.approx(bleu[3]) and ours["bleu1"] == pytest.approx(bleu[0])
    assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert ours["meteor"] == pytest.approx(meteor.compute_score(gts, res)[0])
    assert ours["spice"] is None  # no jars: unavailable, never 0
    assert 0 < ours["bleu4"] < 1 and ours["cider"] > 0
    # a hand-computed case: a candidate equal to its only reference scores BLEU-1 = 1
    same = caption_scores({"x": ["a ship at sea"]}, {"x": "a ship at sea"}, meteor=False)
    assert same["bleu1"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)


def test_caption_bad_input_named(tmp_path):
    from sarkit.errors import SarkitError

    with pytest.raises(SarkitError, match="without a generated caption.*b"):
        caption_scores(REFS, {"a": "x", "b": " ", "c": "y"}, meteor=False)
    with pytest.raises(SarkitError, match="no spice-1.0.jar"):
        caption_scores({"x": ["a b"]}, {"x": "a b"}, meteor=False, spice_jars=tmp_path)


def test_vqa_accuracy_normalises_and_counts_numbers():
    assert answer_matches("Two.", "2", "count") and answer_matches("region 5", "5", "position")
    assert not answer_matches("3", "2", "count")
    assert answer_matches("Water and urban", "urban, water", "all_landforms")
    assert not answer_matches("water", "urban, water", "all_landforms")
    assert answer_matches("the Bare Soil", "bare soil", "main_landform")
    assert answer_matches("2s1", "2S1", "recognition") and not answer_matches("2s", "2S1", "x")
    items = [
        {"type": "count", "answer": "2", "prediction": "two"},
        {"type": "count", "answer": "0", "prediction": "1"},
        {"type": "position", "answer": "5", "prediction": ""},
        {"type": "recognition", "answer": "ship", "prediction": None},
    ]
    got = vqa_accuracy(items)
    assert got["acc_count"] == 50.0 and got["acc_position"] == 0.0
    assert got["acc_overall"] == 25.0 and got["unanswered"] == 2.0 and got["questions"] == 4.0


def test_mtld_and_text_statistics_worked_examples():
    # "the cat" x4: forward, the factor closes at the third word (TTR 2/3 < 0.72) twice,
    # the remaining "the cat" has TTR 1 (a partial factor of 0): 8 words / 2 factors = 4;
    # backward the same
    assert mtld("the cat the cat the cat the cat".split()) == pytest.approx(4.0)
    # "a b c a b c d e": forward, a factor closes at the fifth word (TTR 3/5), the rest
    # "c d e" has TTR 1: 8 / 1; backward a factor closes at "b" (5/7 < 0.72), then "a": 8 / 1
    assert mtld("a b c a b c d e".split()) == pytest.approx(8.0)
    assert distinct([["a", "b", "a"], ["a", "c"]], 1) == pytest.approx(3 / 5)
    assert distinct([["a", "b", "a"], ["a", "b"]], 2) == pytest.approx(2 / 3)
    s = field_stats(["A ship.", "a ship", "Two ships here", ""])
    assert s["texts"] == 3 and s["empty"] == 1
    assert s["duplicate_rate"] == pytest.approx(1 / 3)
    assert s["tokens_mean"] == pytest.approx(7 / 3)


def test_eval_text_on_the_authors_captions_and_against(tmp_path):
    ref = shared("reference", "fusar_klip_caption_part1.json")
    stats = analyse(ref)
    assert set(stats) == {
        "Terrain", "Functionality", "Distribution", "Layout", "Boundary", "Buildings",
        "Roads", "Water", "all",
    }  # fmt: skip
    assert stats["Terrain"]["texts"] == 1000
    mine = tmp_path / "caption.jsonl"
    mine.write_text(
        "\n".join(
            json.dumps({"id": str(i), "path": "x.png", "captions": [f"There is one ship {i}."] * 2})
            for i in range(20)
        )
    )
    proc = sarkit("eval", "text", ref, "--against", mine, check=0)
    out = json.loads(proc.stdout)
    assert set(out) == {ref.name, mine.name}
    assert out[mine.name]["caption"]["texts"] == 40
    assert out[mine.name]["caption"]["duplicate_rate"] == pytest.approx(0.5)
    assert out[ref.name]["Distribution"]["mtld"] > out[mine.name]["caption"]["mtld"]
    assert "mtld" in proc.stderr and "Distribution" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n[1]\n')
    proc = sarkit("eval", "text", bad, check=1)
    assert "bad.jsonl:2" in proc.stderr and "Traceback" not in proc.stderr
    proc = sarkit("eval", "text", ref, "--plot", tmp_path / "t.png", check=2)
    assert "--run" in proc.stderr


def test_eval_vqa_with_an_llm_backend(tmp_path, capsys):
    """Table 7's path: the questions go with their images to an OpenAI-compatible server
    (the local fake one: no key); questions it leaves empty count as unanswered and wrong."""
    from sarkit import cli
    from sarkit.llm.fakeserver import FakeChatServer
    from sarkit.tasks.vl.annotations import read_annotations
    from sarkit.tasks.vl.build import BuildOptions, build

    hrsid = shared("hrsid_mini")
    ann = read_annotations(hrsid / "masks", hrsid / "images", "0,255,0=ship", "ship")
    build(ann, BuildOptions(hrsid / "masks", tmp_path / "sft", ("vqa",)))
    rows = [json.loads(x) for x in (tmp_path / "sft" / "vqa.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    answers = {r["question"]: r["answer"] for r in test if r["type"] == "recognition"}
    answers["How many ships are in the image?"] = "Answer: 99."  # wrong, but an answer
    with FakeChatServer(vqa_answers=answers) as srv:
        capsys.readouterr()
        code = cli.run(["eval", "vqa", "--llm", "gpt-4.1", "--base-url", srv.url, "--data",
                        str(tmp_path / "sft" / "vqa.jsonl"), "--figures", str(tmp_path / "f"),
                        "--concurrency", "2"])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        assert len(srv.bodies) == len(test)
        body = srv.bodies[0]
        assert "response_format" not in body
        assert body["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png")
    m = json.loads(out)["metrics"]
    n_pos = sum(r["type"] == "position" for r in test)
    assert m["acc_recognition"] == 100.0 and m["acc_count"] == 0.0 and m["acc_position"] == 0.0
    assert m["unanswered"] == n_pos and f"{n_pos} question(s) unanswered" in err
    saved = [json.loads(x) for x in (tmp_path / "f" / "vqa_gpt-4.1.jsonl").read_text().splitlines()]
    assert {s["prediction"] for s in saved if s["type"] == "count"} == {"99"}
    keys = tmp_path / "keys.json"
    keys.write_text('{"openai": "sk-test-123"}')
    with FakeChatServer(vqa_answers=answers) as srv:
        code = cli.run(["eval", "vqa", "--llm", "gpt-4.1", "--base-url", srv.url, "--data",
                        str(tmp_path / "sft" / "vqa.jsonl"), "--limit", "3", "--model-id",
                        "my-vlm", "--keys-file", str(keys)])  # fmt: skip
        assert code == 0
        assert len(srv.bodies) == 3 and {b["model"] for b in srv.bodies} == {"my-vlm"}
        assert srv.seen_auth == {"Bearer sk-test-123"}
    out = capsys.readouterr().out
    assert "sk-test-123" not in out and json.loads(out)["metrics"]["questions"] == 3
    capsys.readouterr()
    assert cli.run(["eval", "vqa", "--llm", "offline", "--data", str(tmp_path / "x.jsonl")]) == 2
    assert cli.run(["eval", "vqa", "--data", str(tmp_path / "sft" / "vqa.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "does not answer questions" in err and "needs a RUN folder" in err
