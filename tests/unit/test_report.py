"""The report's pure parts (bins, label counts, error groups, the page's escaping) and its reads on
synthetic outputs written with pyarrow, no model: a 100k-row run reads the images of its sampled
rows and nothing else, and counts every row."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.report import default_html, make_report
from pipeline.report import (ErrorGroup, SampledRow, error_groups, histogram, label_counts, read_run, sample_positions,
                             take_rows)
from pipeline.report_html import gallery_row
from pipeline.report_images import Thumbnail, thumbnails
from tests.helpers import encode, noise_image

PNG = encode(noise_image(40, 30, seed=1))


def test_small_integer_ranges_get_one_bin_per_value_and_others_equal_bins():
    tokens = histogram("num_output_tokens", np.array([3, 4, 4, 7], dtype=np.int32))
    assert tokens.discrete and tokens.edges[:-1] == [3, 4, 5, 6, 7] and tokens.counts == [1, 2, 0, 0, 1]
    times = histogram("generation_ms", np.linspace(0.0, 1000.0, 1001), bins=20)
    assert not times.discrete and len(times.counts) == 20 and times.rows == 1001
    assert (times.edges[0], times.edges[-1], times.maximum) == (0.0, 1000.0, 1000.0)
    assert histogram("generation_ms", np.array([5.0, 5.0])).counts == [2]
    assert histogram("x", np.array([], dtype=np.int32)).counts == []


def test_label_counts_cover_strings_and_a_structs_label_fields_only():
    labels = pa.chunked_array([pa.array(["a", "b", "a", None, "a"])])
    [counts] = label_counts(labels)
    assert (counts.field, counts.counts, counts.missing) == ("answer", [("a", 3), ("b", 1)], 1)

    struct = pa.chunked_array([pa.array([
        {"colour": "red", "count": 1, "ok": {"yes": True}, "size": 1.5, "tags": ["x"]},
        None,
        {"colour": "blue", "count": 1, "ok": {"yes": False}, "size": 2.5, "tags": []},
    ])])
    got = {c.field: (c.counts, c.missing) for c in label_counts(struct)}
    assert got == {"answer.colour": ([("blue", 1), ("red", 1)], 1), "answer.count": ([(1, 2)], 1),
                   "answer.ok.yes": ([(False, 1), (True, 1)], 1)}  # floats and lists are not labels

    free_text = pa.chunked_array([pa.array([f"text {i}" for i in range(30)])])
    assert label_counts(free_text, max_labels=20) == []


def test_errors_are_grouped_by_stage_with_the_first_examples():
    ids = pa.chunked_array([pa.array(list(range(8)))])
    errors = pa.chunked_array([pa.array([None, "fetch: gone", "decode: bad: really", "fetch: x", None,
                                         "fetch: y", "fetch: z", "decode: worse"])])
    assert error_groups(ids, errors, examples=2) == [
        ErrorGroup("fetch", 4, [(1, "fetch: gone"), (3, "fetch: x")]),
        ErrorGroup("decode", 2, [(2, "decode: bad: really"), (7, "decode: worse")]),
    ]


def test_samples_are_repeatable_and_rows_are_taken_across_row_groups(tmp_path):
    assert sample_positions(100, 5) == sample_positions(100, 5) and len(set(sample_positions(100, 5))) == 5
    assert sample_positions(3, 10) == [0, 1, 2]
    pq.write_table(pa.table({"id": list(range(100)), "x": [str(i) for i in range(100)]}), tmp_path / "f.parquet",
                   row_group_size=10)
    table = take_rows(pq.ParquetFile(tmp_path / "f.parquet"), [3, 45, 46, 99], ["x"])
    assert table.column("x").to_pylist() == ["3", "45", "46", "99"]


def test_the_page_shows_client_text_as_text():
    row = SampledRow("<b>id</b>", None, "<script>alert(1)</script>", "</pre><img src=http://x>", None, None, None)
    page = gallery_row(row, Thumbnail(None, "gone <i>"))
    assert "<script>" not in page and "<img src=http" not in page and "<b>" not in page and "<i>" not in page
    assert "&lt;script&gt;" in page and 'class="placeholder"' in page


def test_the_page_goes_beside_a_local_output_and_to_the_current_folder_for_a_remote_one():
    assert default_html("build/demo/output/") == "build/demo/output.html"
    assert default_html("s3://bucket/runs/a") == "a.html"


def _write_output(out: Path, rows: int, input_uri: str, files: int = 100) -> dict:
    """A synthetic output as the job writes it: `files` Parquet files, a config and a summary."""
    out.mkdir()
    rng = np.random.default_rng(0)
    ids = [f"img/{i:06d}.png" for i in range(rows)]
    errors = [None] * rows
    for i in range(0, rows, 1000):
        errors[i] = f"fetch: no such file or object: {ids[i]}"
    for i in range(1, rows, 2500):
        errors[i] = "decode: cannot identify image file"
    labels = ["a", "b", "c"]
    answers = [None if errors[i] else labels[i % 3] for i in range(rows)]
    table = pa.table({
        "id": ids, "prompt": ["[INST] <image>\nWhich? [/INST]"] * rows,
        "response": answers, "error": errors,
        "num_output_tokens": pa.array(rng.integers(1, 4, rows), pa.int32()),
        "generation_ms": rng.random(rows) * 100, "answer": answers,
    })
    per = rows // files
    for k in range(files):
        pq.write_table(table.slice(k * per, per), out / f"part-{k:04d}.parquet")
    fetch_errors = sum(e is not None and e.startswith("fetch") for e in errors)
    decode_errors = sum(e is not None and e.startswith("decode") for e in errors)
    summary = {"rows_out": rows, "errors": fetch_errors + decode_errors,
               "errors_by_stage": {"decode": decode_errors, "fetch": fetch_errors}}
    (out / "_summary.json").write_text(json.dumps(summary))
    (out / "_config.json").write_text(json.dumps({"input": input_uri, "input_format": "images", "id_column": "id",
                                                  "limits": {"max_bytes": 1 << 20, "max_pixels": 10**6}}))
    return summary


def test_a_100k_row_run_reads_only_its_sampled_images_and_counts_every_row(tmp_path):
    summary = _write_output(tmp_path / "out", 100_000, str(tmp_path / "images"))
    reads: list = []

    def read_image(source):
        reads.append(source)
        return PNG

    html = make_report(str(tmp_path / "out"), str(tmp_path / "report.html"), sample=20, read_image=read_image)

    run = read_run(str(tmp_path / "out"), 20)
    sampled = [row.id for row in run.sample]
    assert len(set(sampled)) == 20
    assert sorted(reads) == sorted(f"{tmp_path / 'images'}/{i}" for i in sampled)  # joined, never listed
    assert run.rows == 100_000
    assert {g.stage: g.count for g in run.errors} == summary["errors_by_stage"]
    ok = 100_000 - summary["errors"]
    assert run.tokens.rows == run.generation_ms.rows == ok
    [labels] = run.labels
    assert dict(labels.counts) == {v: sum(1 for i in range(100_000) if i % 3 == k and i % 1000 and i % 2500 != 1)
                                   for k, v in enumerate("abc")}
    page = Path(html).read_text()
    assert len(re.findall(r'<img class="thumb" src="data:image/jpeg;base64,', page)) == 20
    assert f'data-stage="fetch" data-count="{summary["errors_by_stage"]["fetch"]}"' in page


def test_thumbnails_from_a_manifest_read_only_the_sampled_rows(tmp_path):
    ids = list(range(5000))
    images = [PNG if i != 7 else b"not an image" for i in ids]
    pq.write_table(pa.table({"key": ids, "picture": images}), tmp_path / "manifest.parquet", row_group_size=500)
    config = {"input": str(tmp_path / "manifest.parquet"), "input_format": "auto", "id_column": "key",
              "image_column": "picture"}
    reads: list = []

    def read_image(source):
        reads.append(source)
        return source

    thumbs = thumbnails(config, [3, 7, 4999, 123456], read_image)
    assert len(reads) == 3 and reads.count(PNG) == 2
    assert thumbs[3].url.startswith("data:image/jpeg;base64,") and thumbs[4999].missing is None
    assert thumbs[7].url is None and "not an image" in thumbs[7].missing
    assert thumbs[123456].url is None and "not in the input" in thumbs[123456].missing


def _tar(path: Path, samples: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data in samples.items():
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_thumbnails_from_webdataset_shards_and_an_input_that_is_gone(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00000.tar", {"a": PNG, "b": PNG})
    _tar(shards / "00001.tar", {"c": encode(noise_image(300, 200, seed=2), "JPEG")})
    config = {"input": str(shards), "input_format": "webdataset"}
    thumbs = thumbnails(config, ["b", "c"])
    assert all(t.url and t.url.startswith("data:image/jpeg;base64,") for t in thumbs.values())

    gone = thumbnails({"input": str(tmp_path / "moved"), "input_format": "auto"}, ["a"])
    assert gone["a"].url is None and "cannot be read" in gone["a"].missing
    assert "_config.json" in thumbnails(None, ["a"])["a"].missing


def test_an_output_with_no_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run"):
        read_run(str(tmp_path), 5)
