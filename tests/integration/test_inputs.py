"""The datasets users already have, through the real job: folders and S3 prefixes of image files,
WebDataset shards, img2dataset-shaped Parquet, several questions per image, and the start-up
mistakes the job refuses before doing any work."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import annotate
from pipeline.config import AnnotateConfig, ConfigError, EngineConfig
from pipeline.write import OutputExistsError, read_rows
from tests.helpers import encode, kill_after_first_file, noise_image, reference_answer

pytestmark = pytest.mark.integration

MAX_NEW = 6
QUESTIONS = ("What is shown in this image?", "Describe the colours.", "Is there any text?")


def _run(tiny_model: str, input_uri: str, output_uri: str, **kwargs) -> dict:
    engine = EngineConfig(model=tiny_model, max_new_tokens=kwargs.pop("max_new_tokens", MAX_NEW))
    kwargs.setdefault("cpu_workers", 2)
    return annotate.run(AnnotateConfig(input=input_uri, output=output_uri, engine=engine, **kwargs))


def _rows(uri: str) -> dict:
    return {(r["id"], r.get("question_index")): r for r in read_rows(uri).to_pylist()}


def _answer(reference, data: bytes, prompt: str) -> str:
    return reference_answer(reference, [Image.open(io.BytesIO(data))], prompt, MAX_NEW)


def _image_tree() -> dict[str, bytes]:
    """Relative path -> bytes: mixed formats and extension cases, nested folders, a fake image."""
    return {
        "a.jpg": encode(noise_image(60, 40, seed=1), "JPEG"),
        "sub/B.JPEG": encode(noise_image(50, 70, seed=2), "JPEG"),
        "c.png": encode(noise_image(33, 90, seed=3)),
        "d.webp": encode(noise_image(64, 64, seed=4), "WEBP"),
        "sub/deeper/e.PNG": encode(noise_image(80, 30, seed=5)),
        "broken.jpg": b"this is not an image",
    }


@pytest.fixture(scope="module")
def bucket(s3_server):
    if not s3_server.exists("inputs"):
        s3_server.mkdir("inputs")
    return s3_server


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_folder_or_prefix_of_images(where, tiny_model, ray_local, bucket, tmp_path, reference):
    tree = _image_tree()
    if where == "local":
        root = tmp_path / "photos"
        for rel, data in {**tree, "notes.txt": b"ignored"}.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        uri, out = str(root), str(tmp_path / "out")
    else:
        for rel, data in {**tree, "notes.txt": b"ignored"}.items():
            bucket.pipe(f"inputs/photos/{rel}", data)
        uri, out = "s3://inputs/photos/", "s3://inputs/out-photos"
    summary = _run(tiny_model, uri, out)
    rows = _rows(out)
    assert summary["input_format"] == "images"
    assert sorted(k for k, _ in rows) == sorted(tree) and summary["rows_in"] == summary["rows_out"] == len(tree)
    assert rows[("broken.jpg", None)]["error"].startswith("decode: cannot identify image file")
    for rel, data in tree.items():
        if rel != "broken.jpg":
            row = rows[(rel, None)]
            assert row["error"] is None and row["response"] == _answer(reference, data, row["prompt"]), rel


def _shard(path: Path, samples: dict[str, dict[str, bytes]]) -> bytes:
    """A WebDataset tar: each sample's files named KEY.EXT, grouped by key."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_webdataset_shards(where, tiny_model, ray_local, bucket, tmp_path, reference):
    images = {f"{i:09d}": encode(noise_image(40 + 5 * i, 36, seed=10 + i), "JPEG") for i in range(6)}
    shards = []
    for s in range(2):
        samples = {}
        for key in list(images)[3 * s : 3 * s + 3]:
            meta = {"caption": f"caption {key}", "width": 40, "url": f"http://x/{key}.jpg"}
            samples[key] = {"jpg": images[key], "json": json.dumps(meta).encode(), "txt": f"text {key}".encode()}
        shards.append(_shard(tmp_path, samples))
    no_image = _shard(tmp_path, {"000000099": {"json": b'{"caption": "lost"}'}})
    if where == "local":
        (tmp_path / "wds").mkdir()
        for k, data in enumerate([*shards, no_image]):
            (tmp_path / "wds" / f"{k:05d}.tar").write_bytes(data)
        uri, out = str(tmp_path / "wds"), str(tmp_path / "out")
    else:
        for k, data in enumerate([*shards, no_image]):
            bucket.pipe(f"inputs/wds/{k:05d}.tar", data)
        uri, out = "s3://inputs/wds/", "s3://inputs/out-wds"
    summary = _run(tiny_model, uri, out, keep_columns=("caption", "txt"))
    rows = _rows(out)
    assert summary["input_format"] == "webdataset" and summary["rows_out"] == summary["rows_in"] == 7
    assert sorted(k for k, _ in rows) == sorted([*images, "000000099"])
    assert rows[("000000099", None)]["error"] == "read: sample 000000099 has no image file (its fields: json)"
    for key, data in images.items():
        row = rows[(key, None)]
        assert (row["caption"], row["txt"]) == (f"caption {key}", f"text {key}")
        assert row["response"] == _answer(reference, data, row["prompt"])


def test_img2dataset_parquet_with_failed_downloads(tiny_model, ray_local, tmp_path, reference):
    ok = {f"{i:09d}": encode(noise_image(48, 40 + i, seed=20 + i), "JPEG") for i in range(4)}
    keys = [*ok, "000000010", "000000011"]
    table = pa.table({
        "key": keys,
        "jpg": pa.array([ok.get(k) for k in keys], pa.binary()),
        "url": [f"http://x/{k}.jpg" for k in keys],
        "caption": [f"c{k}" for k in keys],
        "width": [40] * len(keys),
        "height": [40] * len(keys),
        "status": ["success"] * len(ok) + ["failed_to_download", "failed_to_resize"],
    })
    pq.write_table(table, tmp_path / "000000000.parquet")
    _run(tiny_model, str(tmp_path / "000000000.parquet"), str(tmp_path / "out"), id_column="key",
         image_column="jpg", keep_columns=("caption",))
    rows = _rows(str(tmp_path / "out"))
    assert rows[("000000010", None)]["error"] == "fetch: the download failed (status: failed_to_download)"
    assert rows[("000000011", None)]["error"] == "fetch: the download failed (status: failed_to_resize)"
    for key, data in ok.items():
        assert rows[(key, None)]["response"] == _answer(reference, data, rows[(key, None)]["prompt"])
        assert rows[(key, None)]["caption"] == f"c{key}"


def _question_manifest(tmp_path: Path, count: int) -> tuple[str, dict[str, bytes]]:
    images = {f"img{i}": encode(noise_image(30 + 7 * i, 50, seed=40 + i)) for i in range(count)}
    pq.write_table(pa.table({"id": list(images), "image": list(images.values())}), tmp_path / "m.parquet")
    (tmp_path / "questions.txt").write_text("\n".join(QUESTIONS) + "\n")
    return str(tmp_path / "m.parquet"), images


def test_three_questions_per_image(tiny_model, ray_local, tmp_path, reference):
    manifest, images = _question_manifest(tmp_path, 4)
    args = ["--input", manifest, "--output", str(tmp_path / "out"), "--model", tiny_model,
            "--questions-file", str(tmp_path / "questions.txt"), "--max-new-tokens", str(MAX_NEW)]
    cfg = annotate.config_from_args(annotate.parser().parse_args(args))
    assert cfg.questions == QUESTIONS
    summary = annotate.run(cfg)
    rows = _rows(str(tmp_path / "out"))
    assert sorted(rows) == sorted((k, q) for k in images for q in range(3))
    assert summary["rows_out"] == summary["unique_pairs_out"] == 12 and summary["questions_per_row"] == 3
    assert summary["engine"]["image_encodings_run"] == len(images)
    for (key, q), row in rows.items():
        assert row["question"] == QUESTIONS[q] and row["error"] is None
        assert row["response"] == _answer(reference, images[key], row["prompt"])


def test_questions_from_a_column(tiny_model, ray_local, tmp_path, reference):
    images = {"x": encode(noise_image(40, 40, seed=60)), "y": encode(noise_image(60, 30, seed=61))}
    asked = {"x": ["What is it?", "Any text?"], "y": ["Describe it."]}
    pq.write_table(pa.table({"id": list(images), "image": list(images.values()), "asks": list(asked.values())}),
                   tmp_path / "m.parquet")
    _run(tiny_model, str(tmp_path / "m.parquet"), str(tmp_path / "out"), questions_column="asks")
    rows = _rows(str(tmp_path / "out"))
    assert sorted(rows) == [("x", 0), ("x", 1), ("y", 0)]
    for (key, q), row in rows.items():
        assert row["question"] == asked[key][q]
        assert row["response"] == _answer(reference, images[key], row["prompt"])


def test_a_killed_run_with_questions_resumes_to_every_pair_once(tiny_model, ray_local, tmp_path, reference):
    import ray

    manifest, images = _question_manifest(tmp_path, 24)
    out = tmp_path / "out"
    args = ["--input", manifest, "--output", str(out), "--model", tiny_model,
            "--questions-file", str(tmp_path / "questions.txt"), "--max-new-tokens", "16", "--batch-size", "2",
            "--preprocess-batch-size", "2", "--cpu-workers", "1", "--rows-per-file", "6",
            "--ray-address", ray.get_runtime_context().gcs_address]
    kill_after_first_file(args, out, tmp_path / "driver.log")
    first = read_rows(str(out)).num_rows
    assert 0 < first < 3 * len(images), "the kill must land mid-run"
    summary = _run(tiny_model, manifest, str(out), questions=QUESTIONS, resume=True, max_new_tokens=16)
    rows = read_rows(str(out)).to_pylist()
    pairs = [(r["id"], r["question_index"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 3 * len(images) == summary["rows_out"]
    for row in rows[:6]:
        assert row["response"] == reference_answer(reference, [Image.open(io.BytesIO(images[row["id"]]))],
                                                   row["prompt"], 16)


def test_mistakes_are_refused_before_any_work(tiny_model, ray_local, tmp_path):
    manifest, _ = _question_manifest(tmp_path, 1)
    engine = EngineConfig(model=tiny_model)
    for keep in ("model", "finish_reason", "question_index", "tiles", "num_output_tokens"):
        with pytest.raises(ConfigError, match="rename them in the input or leave them out"):
            AnnotateConfig(input=manifest, output=str(tmp_path / "o"), engine=engine, keep_columns=(keep,))
    with pytest.raises(ConfigError, match="lies inside --input"):
        AnnotateConfig(input=str(tmp_path), output=str(tmp_path / "out"), engine=engine)
    with pytest.raises(ConfigError, match="lies inside --input"):
        AnnotateConfig(input="s3://b/photos/", output="s3://b/photos/answers", engine=engine)
    out = str(tmp_path.parent / f"{tmp_path.name}-out")
    _run(tiny_model, manifest, out, max_new_tokens=4)
    before = sorted(os.listdir(out))
    with pytest.raises(OutputExistsError) as info:
        _run(tiny_model, manifest, out, max_new_tokens=5, resume=True, prompt="Other?")
    assert "engine.max_new_tokens" in str(info.value) and "prompt" in str(info.value)
    assert "--force-config" in str(info.value)
    assert sorted(os.listdir(out)) == before
    forced = AnnotateConfig(input=manifest, output=out, engine=EngineConfig(model=tiny_model, max_new_tokens=5),
                            retry_errors=True, force_config=True)
    annotate.check_continuation(forced)  # passes: the operator chose to mix configurations
