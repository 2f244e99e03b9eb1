import io
import json
import os

import pytest

from sarkit.errors import RecordError, SarkitError
from sarkit.records import RecordWriter, read_records
from sarkit.report import Report


def test_reads_stdin_and_skips_blank_lines(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO('{"id": "a"}\n\n{"id": "b", "x": 1}\n'))
    got = [(it.source, it.line, it.record) for it in read_records(["-"])]
    assert got == [("<stdin>", 1, {"id": "a"}), ("<stdin>", 3, {"id": "b", "x": 1})]


def test_missing_key_names_line_and_key(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "path": "x"}\n{"id": "b"}\n')
    with pytest.raises(RecordError, match=r"in\.jsonl:2 \(b\): record is missing key 'path'"):
        list(read_records([str(path)], required=("id", "path")))


def test_bad_lines_are_reported_and_good_ones_flow(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a"}\nnot json\n[1, 2]\n{"id": "d"}\n')
    report = Report("test")
    ids = [it.record["id"] for it in read_records([str(path)], report)]
    assert ids == ["a", "d"]
    assert len(report.errors) == 2
    assert report.errors[0].startswith(f"{path}:2: not valid JSON")
    assert "expected a JSON object, got list" in report.errors[1]
    assert report.failed


def test_writer_to_file_is_atomic(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    with pytest.raises(RuntimeError), RecordWriter(out) as writer:
        writer.write({"id": "a"})
        raise RuntimeError("stage died half way")
    assert out.read_text() == "precious\n"
    assert list(tmp_path.iterdir()) == [out], "no temporary file left behind"
    with RecordWriter(out) as writer:
        writer.write({"id": "a", "t": "é"})
    assert json.loads(out.read_text()) == {"id": "a", "t": "é"}


def test_streaming_is_lazy(tmp_path):
    """Records are yielded as lines arrive: constant memory in the stream length."""
    path = tmp_path / "big.jsonl"
    path.write_text("".join(f'{{"id": "r{i}"}}\n' for i in range(1000)))
    stream = read_records([str(path)])
    assert next(stream).record == {"id": "r0"}
    stream.close()


def test_chunks_are_written_atomically_with_the_umask(tmp_path):
    from sarkit.atomic import write_chunks

    target = tmp_path / "new" / "dir" / "tile.tif"
    write_chunks(target, [b"II*\0", b"x" * 10, b""])
    assert target.read_bytes() == b"II*\0" + b"x" * 10
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask

    def broken():
        yield b"half"
        raise OSError("disk gone")

    with pytest.raises(OSError):
        write_chunks(target, broken())
    assert target.read_bytes() == b"II*\0" + b"x" * 10  # the old file is untouched
    assert [p.name for p in target.parent.iterdir()] == ["tile.tif"]  # no temp left


def test_damaged_bytes_cost_their_line_and_a_bom_is_accepted(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"id": "a"}\n{"id": "b\xff"}\n{"id": "c", "t": "caf\xc3\xa9"}\r\n\xc3\n'
    )
    report = Report("test")
    got = [it.record for it in read_records([str(path)], report)]
    assert got == [{"id": "a"}, {"id": "c", "t": "café"}]
    assert report.errors == [
        f"{path}:2: not valid UTF-8 (byte 0xff at column 10)",
        f"{path}:4: not valid UTF-8 (byte 0xc3 at column 1)",
    ]


def test_an_unreadable_source_is_reported_and_the_others_go_on(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": "a"}\n')
    report = Report("test")
    sources = [str(tmp_path / "gone.jsonl"), str(tmp_path), str(good)]
    assert [it.record["id"] for it in read_records(sources, report)] == ["a"]
    assert report.errors == [
        f"{tmp_path / 'gone.jsonl'}: no such file",
        f"{tmp_path}: is a folder, expected a JSON Lines file",
    ]
    with pytest.raises(SarkitError, match="gone.jsonl: no such file"):
        list(read_records(sources))
