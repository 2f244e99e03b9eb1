"""The pretraining loader: fast tile decoding, the cached record table, tar shards.

The new pipeline must give exactly what the old one gave (same pixels as tileread, same
batches as TileDataset + ImageTextCollate), so a run's losses do not depend on which fed
it; shards must train exactly as the records file they were made from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shared
from test_pretrain import TINY, rows
from test_pretrain_data import mstar_records, write_jsonl

from sarkit.model import TERRAIN_FIELDS


def _tif(path, arr, **profile):
    import rasterio

    h, w = arr.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=1,
                       dtype=arr.dtype.name, **profile) as dst:  # fmt: skip
        dst.write(arr, 1)
    return path


def test_tile_decoder_gives_tileread_pixels(tmp_path):
    """Every layout the fast path takes, and the ones it hands to GDAL/PIL, decode to
    read_u8's pixels; a damaged file is a one-line TileReadError naming it."""
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    from sarkit.raster.tileread import TileReadError, read_u8
    from sarkit.train.tiles import _fast_tiff, decode_u8

    warnings.simplefilter("ignore", NotGeoreferencedWarning)
    rng = np.random.default_rng(0)
    u8 = rng.gamma(2, 40, (256, 256)).clip(0, 255).astype(np.uint8)
    cases = {  # name: (profile, fast path expected)
        "slice": (
            dict(
                compress="zstd", zstd_level=1, tiled=True, blockxsize=256, blockysize=256, nodata=0
            ),
            True,
        ),  # fmt: skip
        "deflate-strips": (dict(compress="deflate", nodata=0), True),
        "plain": ({}, True),
        "odd-blocks": (dict(compress="zstd", tiled=True, blockxsize=128, blockysize=128), True),
        "lzw": (dict(compress="lzw"), False),
        "nodata-7": (dict(nodata=7), False),
        "predictor": (dict(compress="deflate", predictor=2), False),
    }
    for name, (profile, fast) in cases.items():
        arr = u8[:211, :250] if name == "odd-blocks" else u8
        path = _tif(tmp_path / f"{name}.tif", arr, **profile)
        data = path.read_bytes()
        assert (_fast_tiff(data) is not None) == fast, name
        assert np.array_equal(decode_u8(data, str(path)), read_u8(path)), name
    f32 = _tif(tmp_path / "f32.tif", rng.gamma(1, 1e-3, (40, 30)).astype(np.float32))
    assert np.array_equal(decode_u8(f32.read_bytes(), str(f32)), read_u8(f32))
    chip = next((shared("mstar") / "train" / "0").glob("*.jpeg"))
    assert np.array_equal(decode_u8(chip.read_bytes(), str(chip)), read_u8(chip))
    data = (tmp_path / "slice.tif").read_bytes()
    for bad in (data[:3000], b"not a tile"):
        with pytest.raises(TileReadError, match="bad.tif: ") as err:
            decode_u8(bad, "bad.tif")
        assert "\n" not in str(err.value)


def _dataset(table, augment=True):
    from sarkit.train.data import Augment
    from sarkit.train.pairs import PairDataset

    return PairDataset(table, 48, None, Augment() if augment else None, 3, 0.2, 0.3, 1.0, 0)


def test_table_batches_equal_the_old_collate_and_cache(tmp_path, capsys):
    """Batches from the cached table equal TileDataset + ImageTextCollate's (tokens, segment
    ids, MLM eligibility, groups, augmented pixels); the cache is reused, keyed by the
    records and the tokenizer, and a damaged one is named and rebuilt."""
    from conftest import tiny_bert

    from sarkit.model.text import TextCodec
    from sarkit.train.data import Augment, ImageTextCollate, TileDataset
    from sarkit.train.table import RecordFiles, load_table, open_table

    records = mstar_records(shared("mstar"), "train", 2)
    records[0]["mlm_exclude"] = ["Roads", "Water"]
    records[3]["texts"]["Layout"] = "x " * 300  # trimmed to fit
    for r in records[5:8]:
        del r["group"]  # each its own group
    records[9]["quality"] = {"keep": False}  # skipped, counted
    path = write_jsonl(tmp_path / "r.jsonl", records)
    kept = [r for r in records if r.get("quality", {}).get("keep") is not False]
    codec = TextCodec.from_pretrained(str(tiny_bert()), TERRAIN_FIELDS, 40)
    files = RecordFiles([path])
    table = open_table(files.paths, files.items, codec, files.kind, str(path))
    err = capsys.readouterr().err
    assert "tokenising" in err and "1 dropped by filter" in err
    ds = _dataset(table)
    ds.set_epoch(2)
    old = TileDataset(kept, 48, None, Augment(), 3, 0.2, 0.3)
    old.set_epoch(2)
    pick = [4, 0, 7, 3, 18, 6]
    want = ImageTextCollate(kept, codec)([old[i] for i in pick])
    got = ds.__getitems__(pick)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert not got["mlm_eligible"][1].all()  # record 0's Roads and Water

    # a second open is a cache hit; other records make another cache
    again = open_table(files.paths, files.items, codec, files.kind, str(path))
    assert "tokenising" not in capsys.readouterr().err
    assert np.array_equal(again.columns["tokens"], table.columns["tokens"])
    write_jsonl(path, records[:12])
    short = open_table(files.paths, files.items, codec, files.kind, str(path))
    folders = list((tmp_path / ".sarkit-cache").iterdir())
    assert len(folders) == 2 and len(short) == 11  # record 9 dropped

    # damaged: a truncated column is named, rebuilt, and gives the same batches
    from sarkit.train.table import cache_folder, cache_key

    folder = cache_folder(files.paths, cache_key(files.paths, codec, "jsonl"), None)
    before = np.array(short.columns["tokens"])  # a copy: the damage below is in place
    tokens = folder / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:100])
    with pytest.raises(Exception, match="tokens.npy: damaged token cache"):
        load_table(folder)
    rebuilt = open_table(files.paths, files.items, codec, files.kind, str(path))
    err = capsys.readouterr().err
    assert f"{tokens}: damaged token cache" in err and "rebuilding" in err
    assert np.array_equal(rebuilt.columns["tokens"], before)
    assert not list(folder.parent.glob(".*.partial"))  # atomic: no leftovers


def test_shards_train_exactly_as_the_records_file(tmp_path, cli_in_process):
    """`sarkit shard` then `sarkit pretrain shards/*.tar`: the same losses step for step as
    the records file; a damaged shard is one line naming it."""
    recs = mstar_records(shared("mstar"), "train", 2)[:14]
    records = write_jsonl(tmp_path / "r.jsonl", recs)
    proc = cli_in_process("shard", records, "-o", tmp_path / "shards", "--per-shard", "5",
                          check=0)  # fmt: skip
    assert "14 records -> 3 shard(s)" in proc.stderr
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert [p.name for p in shards] == [f"shard-00000{i}.tar" for i in range(3)]
    import tarfile

    with tarfile.open(shards[0]) as tar:  # WebDataset's layout: key.json + key.<tile>
        names = tar.getnames()
        assert names[:2] == ["000000000.json", "000000000.jpeg"]
        assert json.loads(tar.extractfile(names[0]).read())["id"] == recs[0]["id"]
    common = [*TINY, "--workers", "0", "--max-steps", "3", "--save-every", "0"]
    cli_in_process("pretrain", records, "-o", tmp_path / "files", *common, check=0)
    cli_in_process("pretrain", *shards, "-o", tmp_path / "tars", *common, check=0)
    a, b = rows(tmp_path / "files"), rows(tmp_path / "tars")
    assert len(a) == 3
    for key in ("loss", "itc", "itm", "mlm", "temp"):
        assert [r[key] for r in a] == [r[key] for r in b], key

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "s.tar").write_bytes(shards[1].read_bytes()[:7000])
    proc = cli_in_process("pretrain", broken / "s.tar", "-o", tmp_path / "x", *common)
    assert proc.returncode == 1
    assert f"{broken / 's.tar'}: damaged shard" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cache_goes_to_the_run_folder_when_the_records_folder_is_read_only(tmp_path, monkeypatch):
    from sarkit.train import table

    records = write_jsonl(tmp_path / "r.jsonl", [])
    key = {"k": 1}
    assert table.cache_folder([records], key, tmp_path / "run").parent == tmp_path / ".sarkit-cache"
    monkeypatch.setattr(table.os, "access", lambda path, mode: False)  # as for a read-only mount
    got = table.cache_folder([records], key, tmp_path / "run")
    assert got.parent == tmp_path / "run" / "data-cache" and got.name.startswith("r-")
