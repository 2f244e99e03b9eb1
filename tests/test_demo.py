import json

from conftest import sarkit


def test_demo_runs_the_landed_pipeline(tmp_path):
    out = tmp_path / "demo"
    proc = sarkit("demo", "-o", out, "--size", "1024", check=0)
    geo = [json.loads(line) for line in (out / "geo.jsonl").read_text().splitlines()]
    assert geo, proc.stderr
    scales = {r["scale"] for r in geo}
    assert scales == {"L", "M", "S"}
    assert all(r["geo"]["place"]["country"] == "CN" for r in geo)
    assert all(r["sensor"] == "gaofen3" for r in geo)
    assert "mostly nodata" in proc.stderr, "the synthetic swath edge is skipped"
    # rerunning resumes: tiles are reused, nothing is redone
    again = sarkit("demo", "-o", out, "--size", "1024", check=0)
    assert "reused (already written)" in again.stderr
