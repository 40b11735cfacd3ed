"""Input kinds without Ray: what `auto` decides, how a folder is listed into rows, and how a
WebDataset sample becomes a row."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.inputs import detect_format, list_images, open_input
from pipeline.webdataset import sample_row
from pipeline.read import ManifestError


def test_auto_tells_the_kinds_apart(tmp_path):
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": [1], "image": [b"x"]}), tmp_path / "pq" / "a.parquet")
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "000.tar").write_bytes(b"")
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "sub" / "x.JPG").write_bytes(b"")
    assert detect_format(str(tmp_path / "pq")) == "parquet"
    assert detect_format(str(tmp_path / "tars")) == "webdataset"
    assert detect_format(str(tmp_path / "imgs")) == "images"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ManifestError, match="--input-format"):
        detect_format(str(tmp_path / "other"))


def test_a_folder_lists_as_relative_ids_a_page_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.inputs.LISTING_PAGE", 2)
    names = ["a.png", "b.JPEG", "sub/c.webp", "sub/deep/d.gif", "skip.txt"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    pages = list(list_images(pa.table({"root": [str(tmp_path)]}), str(tmp_path)))
    ids = [i for page in pages for i in page.column("id").to_pylist()]
    assert sorted(ids) == sorted(n for n in names if n != "skip.txt") and len(pages) >= 2
    uris = [u for page in pages for u in page.column("image").to_pylist()]
    assert all(u.startswith(str(tmp_path)) for u in uris)
    globbed = list(list_images(pa.table({"root": ["x"]}), str(tmp_path / "sub" / "*.webp")))
    assert [i for page in globbed for i in page.column("id").to_pylist()] == ["c.webp"]  # relative to sub/


def test_a_webdataset_sample_becomes_a_row():
    fields = {"png": b"PNG", "json": json.dumps({"caption": "a cat", "width": 9}).encode(), "txt": b"hello"}
    row = sample_row("k1", fields, ("caption", "width", "txt", "absent"))
    assert row == {"id": "k1", "image": b"PNG", "read_error": None, "caption": "a cat", "width": "9",
                   "txt": "hello", "absent": None}
    assert sample_row("k2", {"jpg": b"JPG", "png": b"PNG", "json": b"not json"}, ("caption",))["image"] == b"JPG"
    bare = sample_row("k3", {"json": b"{}"}, ())
    assert bare["image"] is None and bare["read_error"] == "read: sample k3 has no image file (its fields: json)"


def test_parquet_checks_and_the_download_status(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "jpg": [b"x"], "status": ["success"]}), tmp_path / "m.parquet")
    spec = open_input(str(tmp_path / "m.parquet"), "auto", "key", "jpg", ())
    assert (spec.kind, spec.rows, spec.status_column, spec.columns.image) == ("parquet", 1, "status", "jpg")
    with pytest.raises(ManifestError, match="--image-column"):
        open_input(str(tmp_path / "m.parquet"), "parquet", "key", "png", ())
    with pytest.raises(ManifestError, match="does not exist"):
        open_input(str(tmp_path / "missing"), "images", "id", None, ())
