"""From Python: `annotate` on a Ray Dataset the caller already has, and `Engine.ask` from a notebook,
give the CLI's answers for the same images, token for token."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest
from PIL import Image

from actors.engine import Engine
from jobs import annotate
from pipeline.config import ConfigError
from pipeline.write import read_rows
from tests.helpers import encode, noise_image

MAX_NEW = 12  # the session engine's own limit, so `engine.ask` and the job answer alike
SIZES = [(64, 64), (300, 80), (40, 190), (90, 33)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    (root / "images").mkdir()
    for k, size in enumerate(SIZES):
        noise_image(*size, seed=700 + k).save(root / "images" / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def cli_rows(tiny_model, ray_local, folder) -> dict[str, dict]:
    """The CLI's answers for the folder, with token ids (--logprobs 0)."""
    code = annotate.main(["--input", str(folder / "images"), "--output", str(folder / "cli"), "--model", tiny_model,
                          "--max-new-tokens", str(MAX_NEW), "--logprobs", "0", "--cpu-workers", "2"])
    assert code == 0
    return {row["id"]: row for row in read_rows(str(folder / "cli")).to_pylist()}


def _tokens(row: dict) -> list[int]:
    return [e["token_id"] for e in row["token_logprobs"]]


def _same(rows: list[dict], cli_rows: dict[str, dict], name) -> None:
    assert len(rows) == len({name(r) for r in rows})
    for row in rows:
        expected = cli_rows[name(row)]
        assert row["error"] is None, row
        assert (row["response"], _tokens(row)) == (expected["response"], _tokens(expected)), name(row)
        assert row["prompt"] == expected["prompt"]


def test_annotate_on_read_images_equals_the_cli(tiny_model, ray_local, folder, cli_rows):
    import ray

    ds = ray.data.read_images(str(folder / "images"), include_paths=True)
    ds = ds.filter(lambda r: not r["path"].endswith("3.png"))  # composes with what comes before
    out = annotate.annotate(ds, tiny_model, id_column="path", max_new_tokens=MAX_NEW, logprobs=0,
                            cpu_workers=2)
    rows = out.filter(lambda r: r["error"] is None).take_all()  # ... and after
    assert len(rows) == len(SIZES) - 1
    _same(rows, cli_rows, lambda r: Path(r["id"]).name)


def test_annotate_on_bytes_and_uris_keeps_row_errors(tiny_model, ray_local, folder, cli_rows):
    """A column holds one kind of source (Arrow cannot mix bytes and text); two Datasets, unioned."""
    import ray

    inline = ray.data.from_items([{"key": "0.png", "image": (folder / "images" / "0.png").read_bytes()},
                                  {"key": "broken", "image": b"not an image"}])
    uris = ray.data.from_items([{"key": "1.png", "image": str(folder / "images" / "1.png")},
                                {"key": "2.png", "image": f"file://{folder / 'images' / '2.png'}"},
                                {"key": "gone", "image": str(folder / "images" / "missing.png")}])
    options = {"id_column": "key", "max_new_tokens": MAX_NEW, "logprobs": 0, "cpu_workers": 2}
    out = annotate.annotate(inline, tiny_model, **options).union(annotate.annotate(uris, tiny_model, **options))
    out = out.map_batches(lambda t: t.append_column("ok", pc.is_null(t["error"])), batch_format="pyarrow")
    rows = {r["id"]: r for r in out.take_all()}
    assert sorted(rows) == ["0.png", "1.png", "2.png", "broken", "gone"]
    _same([rows[k] for k in ("0.png", "1.png", "2.png")], cli_rows, lambda r: r["id"])
    assert rows["broken"]["error"].startswith("decode: ") and not rows["broken"]["ok"]
    assert rows["gone"]["error"].startswith("fetch: no such file")


@pytest.mark.parametrize("options, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"max_new_tokens": 4, "output": "x"}, "unknown option(s) output for annotate()"),
    ({"choices": ["a"], "regex": "b"}, "give one of json_schema, choices, regex, grammar"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
])
def test_a_wrong_option_fails_at_the_call_with_the_clis_message(tiny_model, ray_local, options, message):
    import ray

    with pytest.raises(ConfigError) as caught:
        annotate.annotate(ray.data.from_items([{"id": 1, "image": b"x"}]), tiny_model, **options)
    assert message in str(caught.value)


def test_a_dataset_without_the_columns_is_refused_naming_them(tiny_model, ray_local):
    import ray

    from pipeline.read import ManifestError

    with pytest.raises(ManifestError, match="no id column 'id'.*Columns found: name, image"):
        annotate.annotate(ray.data.from_items([{"name": "a", "image": b"x"}]), tiny_model)


def test_engine_ask_on_a_pil_image_equals_the_jobs_answer(engine, folder, cli_rows):
    for name in ("0.png", "1.png"):
        image = Image.open(folder / "images" / name)
        got = engine.ask(image, "What is shown in this image?", logprobs=0)
        assert got.error is None
        assert (got.response, got.token_ids) == (cli_rows[name]["response"], _tokens(cli_rows[name]))
    many = engine.ask_many([(str(folder / "images" / "2.png"), "What is shown in this image?"),
                            (encode(noise_image(8, 8, seed=1)), "<image> and <image>?"),
                            (folder / "images" / "nothing.png", "What?")])
    assert many[0].response == cli_rows["2.png"]["response"]
    assert many[1].error.startswith("prompt: ") and many[2].error.startswith("fetch: ")


def test_engine_from_pretrained_checks_its_options(tiny_model):
    with pytest.raises(ConfigError, match="scheduler must be one of"):
        Engine.from_pretrained(tiny_model, scheduler="fastest")
