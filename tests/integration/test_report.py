"""The report of real runs, opened in a real headless browser: the real job (real Ray, the tiny
checkpoint) annotates a few images, with rows that fail at known stages and an input image deleted
after the run; `python -m jobs.report` writes the page; Debian's chromium, driven by Playwright,
loads it with no network request, every gallery image decodes, the numbers on the page are the
run's `_summary.json`, and each failed row is listed under its stage. The same for an output and
an input on S3.

Without chromium or Playwright the browser tests skip here, but fail under CI=true (.ci/run
installs chromium), so they never pass unseen in CI.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import annotate, report
from pipeline.storage import filesystem
from pipeline.write import read_rows
from tests.helpers import encode, noise_image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Labels of several tokens: single-token labels (a,b,c) stop the tiny checkpoint's engine loop at
# HEAD (its choice scoring reads a slot already released) and the job then waits forever.
CHOICES = ("circle", "square", "triangle")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the report's browser test (.ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless chromium with a fresh profile, driven by Playwright."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    if not os.path.exists(CHROMIUM):
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=BROWSER_ARGS, viewport={"width": 1280, "height": 900})
        yield context
        context.close()


def _job(tiny_model: str, input_uri: str, output_uri: str, *flags: str) -> dict:
    assert annotate.main(["--input", input_uri, "--output", output_uri, "--model", tiny_model,
                          "--max-new-tokens", "8", "--cpu-workers", "2", *flags]) == 0
    return json.loads(_read_text(f"{output_uri}/_summary.json"))


def _read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    return fs.cat_file(path).decode()


def _open(browser, page_file: Path, screenshot: Path) -> dict:
    """Load the page and read what a person would see: requests made, gallery images, numbers."""
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(page_file.as_uri(), wait_until="load")
    seen = page.evaluate("""() => ({
        images: [...document.querySelectorAll('#gallery img')].map(img => ({
            id: JSON.parse(img.closest('figure').dataset.id), cls: img.className,
            complete: img.complete, width: img.naturalWidth,
            text: img.closest('figure').innerText})),
        summary: [...document.querySelectorAll('[data-summary]')].map(td =>
            [JSON.parse(td.dataset.summary), JSON.parse(td.dataset.value)]),
        stages: Object.fromEntries([...document.querySelectorAll('#errors .stage')].map(div =>
            [div.dataset.stage, {count: Number(div.dataset.count),
             ids: [...div.querySelectorAll('tr')].map(tr => JSON.parse(tr.dataset.id)),
             text: div.innerText}])),
        labels: [...document.querySelectorAll('#charts .bar')].map(bar =>
            [bar.dataset.field, JSON.parse(bar.dataset.value), Number(bar.dataset.count)]),
        histograms: Object.fromEntries([...document.querySelectorAll('[data-histogram]')].map(div =>
            [div.dataset.histogram, Number(div.dataset.rows)])),
    })""")
    page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    seen["requests"] = requests
    return seen


def _nested(pairs: list) -> dict:
    """The page's (key path, value) pairs back into the summary's nesting."""
    out: dict = {}
    for path, value in pairs:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _assert_seen_as_a_person_would(seen: dict, page_file: Path, screenshot: Path, summary: dict) -> None:
    assert all(url in (page_file.as_uri(),) or url.startswith("data:") for url in seen["requests"]), seen["requests"]
    assert seen["images"] and all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]
    assert _nested(seen["summary"]) == summary
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50 and pixels.std() > 10  # not a blank page


@pytest.fixture(scope="module")
def local_run(tiny_model, ray_local, tmp_path_factory) -> tuple[Path, dict]:
    """A manifest run with --choices (labels, so their counts are charted): three good images, one deleted after the run, one path
    to nothing (a fetch error) and one text file named .png (a decode error)."""
    root = tmp_path_factory.mktemp("report")
    for k in range(4):
        noise_image(60 + 20 * k, 50, seed=900 + k).save(root / f"{k}.png")
    (root / "text.png").write_text("not an image")
    ids = ["ok-0", "ok-1", "ok-2", "deleted", "missing", "text"]
    paths = [root / "0.png", root / "1.png", root / "2.png", root / "3.png", root / "nothing.png", root / "text.png"]
    pq.write_table(pa.table({"id": ids, "image": [str(p) for p in paths]}), root / "manifest.parquet")
    summary = _job(tiny_model, str(root / "manifest.parquet"), str(root / "out"), "--choices", ",".join(CHOICES))
    (root / "3.png").unlink()
    return root, summary


def test_the_report_of_a_local_run_in_a_browser(browser, local_run, tmp_path):
    root, summary = local_run
    assert summary["errors_by_stage"] == {"decode": 1, "fetch": 1}
    page_file = tmp_path / "report.html"
    assert report.main([str(root / "out"), "--html", str(page_file), "--sample", "50"]) == 0

    seen = _open(browser, page_file, tmp_path / "report.png")

    _assert_seen_as_a_person_would(seen, page_file, tmp_path / "report.png", summary)
    images = {i["id"]: i for i in seen["images"]}
    assert sorted(images) == ["deleted", "missing", "ok-0", "ok-1", "ok-2", "text"]
    assert all(images[i]["cls"] == "thumb" for i in ("ok-0", "ok-1", "ok-2"))
    for gone in ("deleted", "missing", "text"):
        assert images[gone]["cls"] == "placeholder" and "image unavailable" in images[gone]["text"], images[gone]
    assert "no such file" in images["deleted"]["text"]
    assert {stage: (v["count"], v["ids"]) for stage, v in seen["stages"].items()} == {
        "decode": (1, ["text"]), "fetch": (1, ["missing"])}
    assert "nothing.png" in seen["stages"]["fetch"]["text"]
    rows = read_rows(str(root / "out")).to_pylist()
    answers = [r["answer"] for r in rows if r["answer"] is not None]
    assert sorted((v, n) for _, v, n in seen["labels"]) == sorted((a, answers.count(a)) for a in set(answers))
    assert {f for f, _, _ in seen["labels"]} == {"answer"} and set(answers) <= set(CHOICES)
    assert seen["histograms"] == {"num_output_tokens": summary["ok"], "generation_ms": summary["ok"]}


def test_the_report_of_an_s3_run_with_an_s3_input(browser, tiny_model, ray_local, s3_server, tmp_path):
    if not s3_server.exists("report"):
        s3_server.mkdir("report")
    s3_server.pipe("report/images/a.png", encode(noise_image(80, 64, seed=1)))
    s3_server.pipe("report/images/sub/b.png", encode(noise_image(80, 64, seed=2)))
    summary = _job(tiny_model, "s3://report/images/", "s3://report/out")
    page_file = tmp_path / "s3.html"
    assert report.main(["s3://report/out", "--html", str(page_file)]) == 0

    seen = _open(browser, page_file, tmp_path / "s3.png")

    _assert_seen_as_a_person_would(seen, page_file, tmp_path / "s3.png", summary)
    assert sorted((i["id"], i["cls"]) for i in seen["images"]) == [("a.png", "thumb"), ("sub/b.png", "thumb")]
    assert seen["stages"] == {} and seen["labels"] == []
