"""The batch job end to end: real local Ray, real S3 (SeaweedFS), real Parquet in and out."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import annotate
from pipeline.config import AnnotateConfig, EngineConfig
from pipeline.storage import arrow_filesystem, filesystem
from pipeline.schemas import OUTPUT_COLUMNS
from pipeline.write import read_rows
from tests.helpers import encode, noise_image, reference_answer

MAX_NEW = 8
SIZES = [(64, 64), (300, 80), (40, 190), (1, 1), (640, 480), (2000, 20), (90, 33)]


@pytest.fixture(scope="module")
def bucket(s3_server):
    """The test bucket; each test writes under its own prefix."""
    if not s3_server.exists("data"):
        s3_server.mkdir("data")
    return s3_server


@pytest.fixture(scope="module")
def images() -> dict[int, bytes]:
    return {i: encode(noise_image(*SIZES[i % len(SIZES)], seed=100 + i)) for i in range(7)}


def _write(uri: str, table: pa.Table) -> None:
    fs, path = filesystem(uri)
    pq.write_table(table, path, filesystem=arrow_filesystem(fs))


def _run(tiny_model: str, input_uri: str, output_uri: str, **kwargs) -> dict:
    engine = EngineConfig(model=tiny_model, max_new_tokens=MAX_NEW)
    kwargs.setdefault("cpu_workers", 2)  # two cores here: more workers only contend on imports
    return annotate.run(AnnotateConfig(input=input_uri, output=output_uri, engine=engine, **kwargs))


def _rows(output_uri: str) -> list[dict]:
    return read_rows(output_uri).to_pylist()


def _assert_reference(rows: list[dict], images_of: dict, reference) -> None:
    for row in rows:
        assert row["error"] is None, row
        pil = [Image.open(io.BytesIO(data)) for data in images_of[row["id"]]]
        assert row["response"] == reference_answer(reference, pil, row["prompt"], MAX_NEW), row["id"]


def test_uri_manifest_from_s3_to_s3(tiny_model, ray_local, bucket, images, tmp_path, reference):
    """URIs (s3://, local path, file://) in a prefix of two Parquet files; output to S3."""
    uris = {}
    for i, data in images.items():
        if i % 3 == 0:
            bucket.pipe(f"data/img/{i}.png", data)
            uris[i] = f"s3://data/img/{i}.png"
        else:
            (tmp_path / f"{i}.png").write_bytes(data)
            uris[i] = str(tmp_path / f"{i}.png") if i % 3 == 1 else f"file://{tmp_path / f'{i}.png'}"
    ids = sorted(uris)
    prompts = [None, "Describe <image> briefly.", None, "What colour dominates?", None, None, None]
    table = pa.table({"id": ids, "image": [uris[i] for i in ids], "prompt": prompts, "source": [f"s{i}" for i in ids]})
    _write("s3://data/manifest-uri/part-0.parquet", table.slice(0, 4))
    _write("s3://data/manifest-uri/part-1.parquet", table.slice(4))

    summary = _run(tiny_model, "s3://data/manifest-uri/", "s3://data/out-uri", keep_columns=("source",))

    rows = _rows("s3://data/out-uri")
    assert sorted(r["id"] for r in rows) == ids
    assert summary["rows_in"] == summary["rows_out"] == summary["ok"] == len(ids)
    assert all(r["source"] == f"s{r['id']}" for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert by_id[1]["prompt"] == "[INST] Describe <image> briefly. [/INST]"
    assert by_id[0]["prompt"] == "[INST] <image>\nWhat is shown in this image? [/INST]"
    _assert_reference(rows, {i: [images[i]] for i in ids}, reference)

    fs, path = filesystem("s3://data/out-uri")
    schema = pads.dataset(path, format="parquet", filesystem=arrow_filesystem(fs)).schema
    assert schema.names == ["id", *OUTPUT_COLUMNS, "logprob", "source"]
    assert "tiles" not in schema.names
    assert bucket.exists("data/out-uri/_config.json") and bucket.exists("data/out-uri/_summary.json")


def test_inline_bytes_same_answers_with_two_actors_and_batch_one(tiny_model, ray_local, images, tmp_path):
    ids = sorted(images)
    table = pa.table({"id": [str(i) for i in ids], "image": [images[i] for i in ids]})
    for k in range(2):
        pq.write_table(table.slice(k * 4, 4), tmp_path / f"part-{k}.parquet")
    glob = str(tmp_path / "part-*.parquet")
    one = _run(tiny_model, glob, str(tmp_path / "out-1"), batch_size=8, actors=(1, 1))
    two = _run(tiny_model, glob, str(tmp_path / "out-2"), batch_size=1, actors=(2, 2))
    assert one["rows_out"] == two["rows_out"] == len(ids)
    answers_1 = {r["id"]: r["response"] for r in _rows(str(tmp_path / "out-1"))}
    answers_2 = {r["id"]: r["response"] for r in _rows(str(tmp_path / "out-2"))}
    assert answers_1 == answers_2 and len(answers_1) == len(ids)
    assert len(set(answers_1.values())) > 1


def test_hf_structs_in_multi_image_lists(tiny_model, ray_local, bucket, images, tmp_path, reference):
    bucket.pipe("data/struct/5.png", images[5])
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = {
        "a": [{"bytes": images[0], "path": None}],
        "b": [{"bytes": images[1], "path": "x.png"}, {"bytes": None, "path": "s3://data/struct/5.png"}],
        "c": [{"bytes": images[2], "path": None}, {"bytes": images[3], "path": None}, {"bytes": images[4], "path": None}],
    }
    table = pa.table(
        {
            "key": list(rows),
            "images": pa.array(list(rows.values()), pa.list_(struct)),
            "prompt": [None, "Compare <image> with <image>.", None],
        }
    )
    pq.write_table(table, tmp_path / "manifest.parquet")
    summary = _run(tiny_model, str(tmp_path / "manifest.parquet"), str(tmp_path / "out"), id_column="key")
    out = _rows(str(tmp_path / "out"))
    assert summary["ok"] == 3 and sorted(r["id"] for r in out) == ["a", "b", "c"]
    by_id = {r["id"]: r for r in out}
    assert by_id["c"]["prompt"] == "[INST] <image><image><image>\nWhat is shown in this image? [/INST]"
    images_of = {"a": [images[0]], "b": [images[1], images[5]], "c": [images[2], images[3], images[4]]}
    _assert_reference(out, images_of, reference)


def test_limit(tiny_model, ray_local, images, tmp_path):
    table = pa.table({"id": list(images), "image": list(images.values())})
    pq.write_table(table, tmp_path / "m.parquet")
    summary = _run(tiny_model, str(tmp_path / "m.parquet"), str(tmp_path / "out"), limit=3)
    assert summary["rows_in"] == summary["rows_out"] == 3


def test_manifest_without_image_column_fails_fast(tiny_model, ray_local, tmp_path, capsys):
    pq.write_table(pa.table({"id": [1], "picture": ["x.png"], "note": ["n"]}), tmp_path / "m.parquet")
    code = annotate.main(["--input", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "out"), "--model", tiny_model])
    assert code == 2
    message = capsys.readouterr().out
    assert "no image column" in message and "Columns found: id, picture, note" in message
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_overwrite(tiny_model, ray_local, images, tmp_path, capsys):
    pq.write_table(pa.table({"id": [1], "image": [images[0]]}), tmp_path / "m.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"results of another run")
    (tmp_path / "out" / "_config.json").write_text("{}")  # that run's configuration
    args = ["--input", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "out"), "--model", tiny_model]
    assert annotate.main(args) == 2
    assert "--overwrite" in capsys.readouterr().out
    assert (tmp_path / "out" / "old.parquet").exists()
    assert annotate.main(args + ["--overwrite", "--max-new-tokens", "4"]) == 0
    assert not (tmp_path / "out" / "old.parquet").exists()
    assert len(_rows(str(tmp_path / "out"))) == 1


def test_repeated_images_encode_once_and_the_schedulers_agree(tiny_model, ray_local, images, tmp_path, reference):
    """Three questions on each of three images: the summary counts one encoding per image, a
    prefill well under what was submitted, and the static scheduler gives the same answers."""
    questions = ["What is shown in this image?", "Describe it.", "Any text?"]
    ids = [f"{i}-{q}" for i in range(3) for q in range(3)]
    table = pa.table({
        "id": ids, "image": [images[i] for i in range(3) for _ in range(3)],
        "prompt": [questions[q] for _ in range(3) for q in range(3)],
    })
    pq.write_table(table, tmp_path / "m.parquet")
    cont = _run(tiny_model, str(tmp_path / "m.parquet"), str(tmp_path / "cont"), batch_size=3, actors=(1, 1))
    engine = cont["engine"]
    assert engine["image_encodings_requested"] == 9 and engine["image_encodings_run"] == 3
    assert engine["prefill_tokens_submitted"] == cont["input_tokens"]
    assert engine["prefill_tokens_computed"] < 0.75 * engine["prefill_tokens_submitted"]
    static_engine = EngineConfig(model=tiny_model, max_new_tokens=MAX_NEW, scheduler="static")
    static = annotate.run(AnnotateConfig(input=str(tmp_path / "m.parquet"), output=str(tmp_path / "static"),
                                         engine=static_engine, cpu_workers=2))
    assert static["engine"] == {}
    cont_rows = {r["id"]: r for r in _rows(str(tmp_path / "cont"))}
    static_rows = {r["id"]: r for r in _rows(str(tmp_path / "static"))}
    assert {k: r["response"] for k, r in cont_rows.items()} == {k: r["response"] for k, r in static_rows.items()}
    _assert_reference(list(cont_rows.values()), {k: [images[int(k[0])]] for k in ids}, reference)
