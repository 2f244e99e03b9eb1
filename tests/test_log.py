"""sarkit.log under a launcher: status from rank 0 only, warnings and errors from every rank
with the rank named."""

from __future__ import annotations

import pytest

from sarkit import log


@pytest.mark.parametrize("rank", [None, "0", "1"])
def test_status_from_rank_zero_warnings_from_every_rank(rank, monkeypatch, capsys):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    log._state["console"] = None  # a console made for this test's captured stderr
    log.info("epoch 1 done")
    log.warn("tile x.tif: unreadable; skipped")
    log.error("records.jsonl line 3: not JSON")
    with log.progress("screening", total=2) as advance:
        advance()
    err = capsys.readouterr().err
    if rank == "1":
        assert "epoch 1 done" not in err
        assert "warning: (rank 1) tile x.tif: unreadable; skipped" in err
        assert "error: (rank 1) records.jsonl line 3: not JSON" in err
    else:
        assert "epoch 1 done" in err and "(rank" not in err
        assert "warning: tile x.tif: unreadable; skipped" in err
    log._state["console"] = None


def test_debug_shows_every_rank_status(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    log._state["console"] = None
    log.configure(debug=True)
    log.info("epoch 1 done")
    assert "epoch 1 done" in capsys.readouterr().err
    log._state["console"] = None
