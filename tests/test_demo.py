import json

from conftest import sarkit


def test_demo_runs_the_landed_pipeline(tmp_path):
    out = tmp_path / "demo out"  # a space in the path must survive the step lines
    proc = sarkit("demo", "-o", out, "--size", "1024", check=0)
    geo = [json.loads(line) for line in (out / "geo.jsonl").read_text().splitlines()]
    assert geo, proc.stderr
    assert {r["scale"] for r in geo} == {"L", "M", "S"}
    assert all(r["geo"]["place"]["country"] == "CN" for r in geo)
    assert all(r["sensor"] == "gaofen3" for r in geo)
    assert "mostly nodata" in proc.stderr, "the synthetic swath edge is skipped"
    kept = (out / "kept.jsonl").read_text().splitlines()
    captioned = [json.loads(line) for line in (out / "captioned.jsonl").read_text().splitlines()]
    assert 0 < len(kept) == len(captioned) <= len(geo)
    assert all(len(r["texts"]) == 8 and all(r["texts"].values()) for r in captioned)
    assert (out / "filter-report.png").stat().st_size > 0
    run = out / "runs" / "pretrain"
    assert (run / "metrics.csv").read_text().count("\n") >= 2, "pretraining logged steps"
    assert (run / "export" / "text" / "config.json").exists()
    # rerunning resumes: tiles are reused, nothing is redone
    again = sarkit("demo", "-o", out, "--size", "1024", check=0)
    assert "reused (already written)" in again.stderr
