"""WebDataset shards without Ray: shards found by extension beside img2dataset's listings, samples
grouped by key, and a damaged shard that costs its own rows (every key it lost named), never the job."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.inputs import detect_format
from pipeline.webdataset import find_shards, read_shards, shard_keys


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _listing(path: Path, rows: list[tuple[str, str, str | None]]) -> None:
    keys, statuses, messages = zip(*rows)
    pq.write_table(pa.table({"url": [f"http://x/{k}" for k in keys], "key": list(keys), "status": list(statuses),
                             "error_message": list(messages)}), path)


def _rows(root: Path, keep=(), block_rows=100) -> list[dict]:
    shards = find_shards(str(root))
    batch = pa.table({"shard": list(shards.files), "sidecar": list(shards.sidecars)})
    tables = list(read_shards(batch, str(root), shards.root, keep, {}, block_rows))
    return [r for t in tables for r in t.to_pylist()]


def test_img2dataset_layout_is_found_and_every_url_accounted_for(tmp_path):
    _tar(tmp_path / "00000.tar", {"000000.jpg": b"A", "000000.json": json.dumps({"caption": "c0"}).encode(),
                                  "000001.jpg": b"B", "000001.txt": b"t1"})
    _listing(tmp_path / "00000.parquet", [("000000", "success", None), ("000001", "success", None),
                                           ("000002", "failed_to_download", "HTTP Error 404")])
    (tmp_path / "00000_stats.json").write_text("{}")
    assert detect_format(str(tmp_path)) == "webdataset"
    shards = find_shards(str(tmp_path))
    assert [Path(f).name for f in shards.files] == ["00000.tar"] and shards.sidecars[0].endswith("00000.parquet")
    assert shard_keys(str(tmp_path), shards) == [(shards.files[0], ["000000", "000001", "000002"])]
    rows = _rows(tmp_path, keep=("caption", "txt"))
    assert [(r["id"], r["image"], r["caption"], r["txt"]) for r in rows[:2]] == [
        ("000000", b"A", "c0", None), ("000001", b"B", None, "t1")]
    assert rows[2]["id"] == "000002" and rows[2]["image"] is None
    assert rows[2]["read_error"] == "fetch: the download failed (status: failed_to_download: HTTP Error 404)"


def test_a_shard_that_is_not_a_tar_becomes_error_rows_for_the_keys_it_lists(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "00001.tar")  # a Parquet file named like a shard
    _listing(tmp_path / "00001.parquet", [("000010", "success", None), ("000011", "success", None)])
    (tmp_path / "lone").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "lone" / "shard.tar")  # no listing: one row for the shard
    rows = _rows(tmp_path)
    assert [r["id"] for r in rows] == ["000010", "000011", "lone/shard.tar"]
    assert all(r["read_error"].startswith("read: shard ") and "not a complete tar file" in r["read_error"]
               for r in rows)


def test_a_cut_shard_keeps_the_samples_before_the_damage(tmp_path):
    _tar(tmp_path / "whole.tar", {f"{i:03d}.png": bytes([i]) * 3000 for i in range(6)})
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "whole.tar").unlink()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    rows = _rows(tmp_path, block_rows=2)
    good = [r for r in rows if r["read_error"] is None]
    # 3,584 bytes a member: the cut at 15,872 leaves four whole samples and part of the fifth.
    assert [r["id"] for r in good] == ["000", "001", "002", "003"]
    assert rows[-1]["id"] == "cut.tar" and "not a complete tar file" in rows[-1]["read_error"]
    assert len(rows) == len(good) + 1


def test_gzipped_shards_and_nested_keys(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in {"a/b/k1.jpg": b"1", "a/b/k1.cls": b"3", "./k2.webp": b"2"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tgz").write_bytes(buf.getvalue())
    assert detect_format(str(tmp_path / "s.tgz")) == "webdataset"
    assert [(r["id"], r["image"]) for r in _rows(tmp_path)] == [("a/b/k1", b"1"), ("k2", b"2")]
