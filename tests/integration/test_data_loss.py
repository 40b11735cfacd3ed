"""Nothing lost, through the real job CLI: ids that repeat or are missing, an --output that holds the
input, manifest files that disagree, an empty input, a job stopped on two CPUs, and the folders the
real img2dataset writes."""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.write import read_rows
from tests.helpers import (
    complete_parquet_files,
    encode,
    kill_after_first_file,
    loopback_server,
    noise_image,
    reference_answer,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IMG2DATASET = Path(os.environ.get("IMG2DATASET", ROOT / "build" / "tools" / "bin" / "img2dataset"))
MAX_NEW = 6


def cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m jobs.annotate ARGS` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "jobs.annotate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _on_session_ray(tiny_model: str, extra: list[str]) -> list[str]:
    import ray

    return [*extra, "--model", tiny_model, "--max-new-tokens", str(MAX_NEW), "--cpu-workers", "2",
            "--ray-address", ray.get_runtime_context().gcs_address]


def _summary(out: Path) -> dict:
    return json.loads((out / "_summary.json").read_text())


def test_repeated_and_missing_ids_are_refused_unless_deduplicated(tiny_model, ray_local, tmp_path, reference):
    """a, a, b, null, null with two bad images: refused with the ids named; with --dedupe first the
    first row of each id is kept, and --retry-errors answers the failed one again (it used to drop it)."""
    good = {k: encode(noise_image(40 + k, 30, seed=600 + k)) for k in range(3)}
    pq.write_table(pa.table({"id": ["a", "a", "b", None, None],
                             "image": [b"not an image", good[0], good[1], good[2], b"bad"]}), tmp_path / "m.parquet")
    out = tmp_path / "out"
    base = _on_session_ray(tiny_model, ["--input", str(tmp_path / "m.parquet"), "--output", str(out)])
    refused = cli(base)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert '1 id(s) appear on more than one row ("a" x2)' in refused.stdout
    assert "2 row(s) have no id" in refused.stdout and "--dedupe first" in refused.stdout
    assert not out.exists(), "a refused input leaves no output behind"

    first = cli([*base, "--dedupe", "first"])
    assert first.returncode == 0, first.stderr[-3000:]
    rows = {r["id"]: r for r in read_rows(str(out)).to_pylist()}
    assert sorted(rows) == ["a", "b"]
    assert rows["a"]["error"].startswith("decode: ")  # the first "a" is the bad image
    assert rows["b"]["response"] == reference_answer(reference, [Image.open(io.BytesIO(good[1]))], rows["b"]["prompt"],
                                                     MAX_NEW)
    summary = _summary(out)
    assert (summary["rows_in"], summary["rows_out"], summary["errors"]) == (5, 2, 1)
    assert (summary["duplicate_id_rows_dropped"], summary["null_id_rows_dropped"]) == (1, 2)

    retried = cli([*base, "--dedupe", "first", "--retry-errors"])
    assert retried.returncode == 0, retried.stderr[-3000:]
    summary = _summary(out)
    assert (summary["retried"], summary["rows_out"], summary["unique_ids_out"], summary["errors"]) == (1, 2, 2, 1)


def test_overwrite_never_deletes_the_input_or_anyones_files(tiny_model, ray_local, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["x"], "image": [encode(noise_image(30, 30, seed=610))]}), folder / "in.parquet")
    (folder / "notes.txt").write_text("mine")
    inside = cli(_on_session_ray(tiny_model, ["--input", str(folder / "in.parquet"), "--output", str(folder),
                                              "--overwrite"]))
    assert inside.returncode == 2 and "lies inside --output" in inside.stderr, inside.stderr[-2000:]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.csv").write_text("a,b")
    foreign = cli(_on_session_ray(tiny_model, ["--input", str(folder / "in.parquet"), "--output", str(other),
                                               "--overwrite"]))
    assert foreign.returncode == 2 and "did not write (keep.csv)" in foreign.stdout, foreign.stdout[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == ["in.parquet", "notes.txt"]
    assert (other / "keep.csv").read_text() == "a,b"


def test_manifest_files_that_disagree_stop_the_job_before_any_work(tiny_model, ray_local, tmp_path):
    image = encode(noise_image(30, 30, seed=620))
    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "image": [image, image]}), tmp_path / "m" / "a.parquet")
    pq.write_table(pa.table({"id": ["3"], "image": [image]}), tmp_path / "m" / "b.parquet")
    out = tmp_path / "out"
    done = cli(_on_session_ray(tiny_model, ["--input", str(tmp_path / "m"), "--output", str(out)]))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "column 'id' is int64 in a.parquet but differs in b.parquet (string)" in done.stdout
    assert "Traceback" not in done.stderr and not out.exists()


def test_an_empty_input_leaves_a_file_with_the_output_schema(tiny_model, ray_local, tmp_path):
    schema = pa.schema([("id", pa.int64()), ("image", pa.binary()), ("caption", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "empty.parquet")
    out = tmp_path / "out"
    done = cli(_on_session_ray(tiny_model, ["--input", str(tmp_path / "empty.parquet"), "--output", str(out),
                                            "--keep-columns", "caption"]))
    assert done.returncode == 0, done.stderr[-3000:]
    written = pq.read_table(out / "empty.parquet")
    assert written.num_rows == 0 and written.schema.field("id").type == pa.int64()
    assert written.column_names[:3] == ["id", "prompt", "response"] and "caption" in written.column_names
    assert _summary(out)["rows_in"] == _summary(out)["rows_out"] == 0


def _predictor_progress(log_text: str) -> int:
    """Rows the generation stage has finished, from Ray Data's progress lines in the driver's log."""
    counts = re.findall(r"MapBatches\(Predictor\): (\d+)/", log_text)
    return int(counts[-1]) if counts else 0


def test_a_job_stopped_on_two_cpus_keeps_its_progress(tiny_model, tmp_path, reference):
    """On a local Ray of two CPUs, SIGINT once half the rows are generated: the files written by then
    hold at least a third of the rows (none were written before the write stage reserved no CPU),
    the job says how to continue, and --resume finishes with every id once. The job is started with
    SIGINT ignored, as a shell's `&` leaves it, and must stop all the same."""
    count = 240
    images = {f"r{i:03d}": encode(noise_image(40 + i % 50, 30 + i % 40, seed=700 + i)) for i in range(count)}
    pq.write_table(pa.table({"id": list(images), "image": list(images.values())}), tmp_path / "m.parquet")
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "m.parquet"), "--output", str(out), "--model", tiny_model,
            "--max-new-tokens", "24", "--rows-per-file", "10", "--num-cpus", "2"]
    log_path = tmp_path / "driver.log"
    env = {**os.environ, "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "1"}
    with open(log_path, "wb") as log:
        driver = subprocess.Popen([sys.executable, "-m", "jobs.annotate", *args], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, env=env,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 400
    while _predictor_progress(log_path.read_text(errors="replace")) < count // 2:
        assert driver.poll() is None, log_path.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "the job did not reach half of its rows"
        time.sleep(0.2)
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=120) == 130
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert "stopped by SIGINT" in text and "--num-cpus 2 --resume" in text
    kept = sum(pq.read_metadata(p).num_rows for p in complete_parquet_files(out))
    assert kept >= count // 3, f"only {kept} of {count} rows were in output files when the job stopped"

    resumed = cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_rows(str(out)).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(images) and all(r["error"] is None for r in rows)
    assert _summary(out)["skipped"] >= kept


def test_sigterm_stops_the_job_cleanly(tiny_model, ray_local, tmp_path):
    images = {f"t{i:03d}": encode(noise_image(40, 30, seed=800 + i)) for i in range(48)}
    pq.write_table(pa.table({"id": list(images), "image": list(images.values())}), tmp_path / "m.parquet")
    out = tmp_path / "out"
    args = _on_session_ray(tiny_model, ["--input", str(tmp_path / "m.parquet"), "--output", str(out),
                                        "--rows-per-file", "4", "--batch-size", "2", "--preprocess-batch-size", "2"])
    log_path = tmp_path / "driver.log"
    returncode = kill_after_first_file(args, out, log_path, signal.SIGTERM)
    assert returncode == 143
    text = log_path.read_text(errors="replace")
    assert "stopped by SIGTERM" in text and "--resume" in text and "Traceback" not in text, text[-3000:]


# ---- the real img2dataset ------------------------------------------------------------------


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """A loopback web server with five images, a page that is not an image, and a missing path; and
    the URL list img2dataset is given."""
    root = tmp_path_factory.mktemp("site")
    images = {f"{k}.png": encode(noise_image(36 + 6 * k, 40, seed=900 + k)) for k in range(5)}
    for name, data in {**images, "page.png": b"<html>not an image</html>"}.items():
        (root / name).write_bytes(data)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = loopback_server(Quiet)
    base = f"http://127.0.0.1:{server.server_port}"
    urls = [f"{base}/{name}" for name in [*images, "page.png", "missing.png"]]
    (root / "urls.txt").write_text("\n".join(urls) + "\n")
    yield root / "urls.txt", urls
    server.shutdown()


def _img2dataset(urls_file: Path, out: Path, output_format: str) -> None:
    assert IMG2DATASET.exists(), f"{IMG2DATASET} is missing: `make tools` installs img2dataset"
    done = subprocess.run(
        [str(IMG2DATASET), "--url_list", str(urls_file), "--output_folder", str(out), "--output_format", output_format,
         "--processes_count", "1", "--thread_count", "2", "--resize_mode", "no", "--disable_all_reencoding", "True",
         "--number_sample_per_shard", "4", "--timeout", "5"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _tar_images(folder: Path) -> dict[str, bytes]:
    """key -> image bytes, as img2dataset stored them in its shards."""
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    out[member.name[: -len(".jpg")]] = tar.extractfile(member).read()
    return out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_img2dataset_webdataset_folder(where, downloads, tiny_model, ray_local, s3_server, tmp_path, reference):
    """img2dataset's default layout (00000.tar beside 00000.parquet and 00000_stats.json) read with
    `auto`, locally and from S3: every URL it was given comes out once."""
    urls_file, urls = downloads
    folder = tmp_path / "wds"
    _img2dataset(urls_file, folder, "webdataset")
    assert sorted(p.name for p in folder.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    stored = _tar_images(folder)
    if where == "local":
        uri, out = str(folder), str(tmp_path / "out")
    else:
        if not s3_server.exists("i2d"):
            s3_server.mkdir("i2d")
        s3_server.put(str(folder), "i2d/wds", recursive=True)
        uri, out = "s3://i2d/wds", "s3://i2d/out"
    done = cli(_on_session_ray(tiny_model, ["--input", uri, "--output", out, "--keep-columns", "url"]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "read as webdataset (--input-format auto)" in done.stderr
    rows = read_rows(out).to_pylist()
    assert len(rows) == len(urls) == len({r["id"] for r in rows}), "every URL exactly once"
    by_url = {r["url"]: r for r in rows}  # a failed download keeps the url img2dataset listed for it
    assert sorted(by_url) == sorted(urls)
    assert by_url[urls[6]]["error"].startswith("fetch: the download failed (status: failed_to_download")
    assert by_url[urls[5]]["error"].startswith("decode: cannot identify image file")
    for url in urls[:5]:
        row = by_url[url]
        answer = reference_answer(reference, [Image.open(io.BytesIO(stored[row["id"]]))], row["prompt"], MAX_NEW)
        assert row["error"] is None and row["response"] == answer


def test_img2dataset_parquet_folder(downloads, tiny_model, ray_local, tmp_path):
    """img2dataset's Parquet output (image bytes in a `jpg` column, a `status` per URL) read with `auto`."""
    urls_file, urls = downloads
    folder = tmp_path / "pq"
    _img2dataset(urls_file, folder, "parquet")
    out = tmp_path / "out"
    done = cli(_on_session_ray(tiny_model, ["--input", str(folder), "--output", str(out), "--id-column", "key",
                                            "--image-column", "jpg", "--keep-columns", "url"]))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["url"]: r for r in read_rows(str(out)).to_pylist()}
    assert sorted(rows) == sorted(urls)
    assert rows[urls[6]]["error"].startswith("fetch: the download failed (status: failed_to_download")
    assert rows[urls[5]]["error"].startswith("decode: ")
    assert all(rows[u]["error"] is None for u in urls[:5])

