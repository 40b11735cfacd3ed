"""Nothing lost, nothing twice: bad inputs, a killed actor, a lost node, a killed driver, retries."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from jobs import annotate
from pipeline.config import AnnotateConfig, EngineConfig
from pipeline.write import read_rows
from tests.conftest import free_port
from tests.helpers import animated_gif, encode, exif_rotated, kill_after_first_file, noise_image, reference_answer

MAX_NEW = 6


def _run(tiny_model: str, input_uri: str, output_uri: str, **kwargs) -> dict:
    engine = EngineConfig(model=tiny_model, max_new_tokens=kwargs.pop("max_new_tokens", MAX_NEW))
    kwargs.setdefault("cpu_workers", 2)
    return annotate.run(AnnotateConfig(input=input_uri, output=output_uri, engine=engine, **kwargs))


def _rows(uri: str) -> list[dict]:
    return read_rows(uri).to_pylist()


def _upright(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


VALID = {
    "cmyk": lambda: encode(noise_image(80, 60, seed=24, mode="CMYK"), "JPEG"),
    "16-bit": lambda: encode(Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 37 % 65535).astype(np.uint16))),
    "palette-transparent": lambda: encode(noise_image(60, 40, seed=25).convert("P"), "PNG", transparency=5),
    "rgba": lambda: encode(Image.fromarray(np.random.default_rng(26).integers(0, 256, (30, 70, 4), np.uint8))),
    "exif-rotated": lambda: exif_rotated(90, 40, seed=21, orientation=8),
    "animated-gif": lambda: animated_gif(50, 30, (22, 23)),
    "one-pixel": lambda: encode(noise_image(1, 1, seed=27)),
    "sliver": lambda: encode(noise_image(2000, 20, seed=28)),
}


def test_bad_input_corpus_through_the_job(tiny_model, ray_local, s3_server, tmp_path, reference):
    if not s3_server.exists("faults"):
        s3_server.mkdir("faults")
    good = encode(noise_image(64, 48, seed=29))
    objects = {
        "corrupt": b"\x89PNG\r\n\x1a\n" + os.urandom(300),
        "truncated": encode(noise_image(300, 200, seed=30), "JPEG")[:700],
        "empty": b"",
        "html": b"<!doctype html><html><body>404 Not Found</body></html>",
        "bomb": encode(Image.new("1", (9000, 8000))),
        "good": good,
        **{name: make() for name, make in VALID.items()},
    }
    for name, data in objects.items():
        s3_server.pipe(f"faults/img/{name}", data)
    rows = {name: f"s3://faults/img/{name}" for name in objects}
    rows["missing"] = "s3://faults/img/no-such-object.png"
    rows["null"] = None
    rows["unreachable"] = f"http://127.0.0.1:{free_port()}/image.png"
    rows["placeholders"] = "s3://faults/img/good"
    rows["too-long"] = "s3://faults/img/good"
    prompts = {"placeholders": "<image> and <image>?", "too-long": "describe " * 2000}
    ids = sorted(rows)
    manifest = pa.table(
        {"id": ids, "image": [rows[i] for i in ids], "prompt": [prompts.get(i) for i in ids]}
    )
    pq.write_table(manifest, tmp_path / "manifest.parquet")

    summary = _run(tiny_model, str(tmp_path / "manifest.parquet"), str(tmp_path / "out"), fetch_timeout_s=3.0)

    out = {r["id"]: r for r in _rows(str(tmp_path / "out"))}
    assert sorted(out) == ids and summary["rows_out"] == summary["unique_ids_out"] == len(ids)
    expected_stage = {
        "corrupt": "decode", "truncated": "decode", "empty": "decode", "html": "decode", "bomb": "decode",
        "missing": "fetch", "null": "fetch", "unreachable": "fetch", "placeholders": "prompt", "too-long": "prompt",
    }
    for name, stage in expected_stage.items():
        assert out[name]["error"].startswith(f"{stage}: "), (name, out[name]["error"])
        assert out[name]["response"] is None
    assert "over the limit" in out["bomb"]["error"]
    assert "no such file" in out["missing"]["error"]
    assert "context" in out["too-long"]["error"]
    by_stage = {}
    for stage in expected_stage.values():
        by_stage[stage] = by_stage.get(stage, 0) + 1
    assert summary["errors_by_stage"] == by_stage
    for name in [*VALID, "good"]:
        row = out[name]
        assert row["error"] is None, (name, row["error"])
        assert row["response"] == reference_answer(reference, [_upright(objects[name])], row["prompt"], MAX_NEW), name


def _manifest(tmp_path: Path, count: int, files: int = 4) -> tuple[str, dict[str, bytes]]:
    images = {f"r{i:03d}": encode(noise_image(30 + (7 * i) % 90, 20 + (11 * i) % 70, seed=200 + i)) for i in range(count)}
    ids = sorted(images)
    table = pa.table({"id": ids, "image": [images[i] for i in ids]})
    step = -(-count // files)
    for k in range(files):
        pq.write_table(table.slice(k * step, step), tmp_path / f"part-{k}.parquet")
    return str(tmp_path / "part-*.parquet"), images


def _check_complete(uri: str, images: dict[str, bytes], reference, max_new: int = MAX_NEW, sample: int = 6) -> None:
    rows = _rows(uri)
    assert sorted(r["id"] for r in rows) == sorted(images), "every id exactly once"
    assert all(r["error"] is None for r in rows)
    for row in rows[:sample]:
        assert row["response"] == reference_answer(reference, [_upright(images[row["id"]])], row["prompt"], max_new)


def _predictor_pids() -> list[int]:
    """Generation actors of this session's Ray: the raylet's worker processes titled after them."""
    import psutil
    from ray._private import worker

    raylet = worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for child in psutil.Process(raylet).children(recursive=True):
        try:
            if "MapBatches(Predictor)" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids


def test_a_generation_actor_killed_mid_job(tiny_model, ray_local, tmp_path, reference):
    glob, images = _manifest(tmp_path, 48, files=8)
    result: dict = {}
    job = threading.Thread(
        target=lambda: result.update(
            _run(tiny_model, glob, str(tmp_path / "out"), batch_size=2, preprocess_batch_size=2, max_new_tokens=24)
        )
    )
    job.start()
    deadline = time.monotonic() + 120
    while not _predictor_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # let it answer a few batches
    pids = _predictor_pids()
    assert pids and job.is_alive(), "the kill must land while the job runs"
    os.kill(pids[0], signal.SIGKILL)  # the actor's process dies as on a crash
    job.join(timeout=300)
    assert not job.is_alive() and result["rows_out"] == 48
    _check_complete(str(tmp_path / "out"), images, reference, max_new=24)


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(("_", ".")))


def _settled_rows(folder: Path, quiet_s: float = 3.0, limit_s: float = 90.0) -> dict[Path, int]:
    """Rows in each complete output file, once writes still in flight after the kill have stopped.

    A file appears when its writer opens it, so right after the kill it may be empty or half
    written, and the dead driver's write tasks may still finish or be cut off. Wait until no file
    changes for `quiet_s`, then count only files with a readable footer, as the resume will.
    """
    def snapshot() -> dict[Path, int]:
        return {p: p.stat().st_size for p in _data_files(folder)}

    deadline = time.monotonic() + limit_s
    last, since = snapshot(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, "output files kept changing after the driver was killed"
        time.sleep(0.2)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()
    rows = {}
    for path in last:
        try:
            rows[path] = pq.read_metadata(path).num_rows
        except (pa.ArrowInvalid, OSError):
            continue  # cut short: the resume sets it aside
    return rows


def test_driver_killed_then_resumed(tiny_model, ray_local, tmp_path, reference):
    """SIGKILL the job's driver after its first output file, then finish it with --resume."""
    import ray

    glob, images = _manifest(tmp_path, 64, files=8)
    out = tmp_path / "out"
    args = [
        "--input", glob, "--output", str(out), "--model", tiny_model,
        "--max-new-tokens", "24", "--batch-size", "2", "--preprocess-batch-size", "2", "--cpu-workers", "1",
        "--rows-per-file", "4", "--ray-address", ray.get_runtime_context().gcs_address,
    ]
    kill_after_first_file(args, out, tmp_path / "driver.log")
    complete = _settled_rows(out)
    written = sum(complete.values())
    assert 0 < written < len(images), "the kill must land mid-run"
    whole = min(complete).read_bytes()
    (out / "zz-cut-short.parquet").write_bytes(whole[: len(whole) // 2])  # as a kill mid-write leaves

    summary = _run(tiny_model, glob, str(out), resume=True, max_new_tokens=24)

    assert summary["skipped"] == written and summary["done"] == len(images) - written
    assert summary["rows_out"] == summary["unique_ids_out"] == len(images)
    assert (out / "_partial-zz-cut-short.parquet").exists()
    _check_complete(str(out), images, reference, max_new=24)


def test_retry_errors_replaces_failed_rows(tiny_model, ray_local, tmp_path, reference):
    images = {f"k{i}": encode(noise_image(40 + i, 30, seed=300 + i)) for i in range(6)}
    paths = {k: tmp_path / f"{k}.png" for k in images}
    for k, path in paths.items():
        if k not in ("k1", "k4"):  # two files are missing on the first run
            path.write_bytes(images[k])
    ids = sorted(images)
    pq.write_table(pa.table({"id": ids, "image": [str(paths[k]) for k in ids]}), tmp_path / "m.parquet")
    first = _run(tiny_model, str(tmp_path / "m.parquet"), str(tmp_path / "out"))
    assert first["errors"] == 2 and first["errors_by_stage"] == {"fetch": 2}

    for k in ("k1", "k4"):
        paths[k].write_bytes(images[k])
    second = _run(tiny_model, str(tmp_path / "m.parquet"), str(tmp_path / "out"), retry_errors=True)

    assert (second["skipped"], second["retried"], second["done"]) == (4, 2, 2)
    assert second["errors"] == 0 and second["rows_out"] == 6
    _check_complete(str(tmp_path / "out"), images, reference)


def _hosts_predictor(node) -> bool:
    """Whether a simulated node's raylet runs a generation actor."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    for child in raylet.children(recursive=True):
        try:
            if "MapBatches(Predictor)" in " ".join(child.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def _node_loss_job(tiny_model: str, glob: str, out: str, results) -> None:
    """Runs in a fresh process: a three-node cluster on one machine, one worker node removed mid-job."""
    import traceback

    import ray
    from ray.cluster_utils import Cluster

    # No CPUs on the head: otherwise the generation actor may land there, and no worker node
    # removal can then take it away mid-job.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
        ray.init(address=cluster.address)
        outcome: dict = {}
        job = threading.Thread(
            target=lambda: outcome.update(
                _run(tiny_model, glob, out, batch_size=2, preprocess_batch_size=2, max_new_tokens=24,
                     actors=(1, 1), rows_per_file=4)
            )
        )
        job.start()
        deadline = time.monotonic() + 240
        victim = None
        while victim is None and time.monotonic() < deadline and job.is_alive():
            victim = next((n for n in workers if _hosts_predictor(n)), None)
            time.sleep(0.2)
        time.sleep(1.5)
        removed_mid_job = victim is not None and job.is_alive()
        if victim is not None:
            cluster.remove_node(victim, allow_graceful=False)
        job.join(timeout=400)
        results.put({"victim_found": victim is not None, "removed_mid_job": removed_mid_job,
                     "finished": not job.is_alive(), **outcome})
    except Exception:
        results.put({"error": traceback.format_exc()})
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_worker_node_removed_mid_job(tiny_model, tmp_path, reference):
    glob, images = _manifest(tmp_path, 40, files=8)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_node_loss_job, args=(tiny_model, glob, str(tmp_path / "out"), results))
    proc.start()
    outcome = results.get(timeout=700)
    proc.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["removed_mid_job"] and outcome["finished"], outcome
    assert outcome["rows_out"] == outcome["unique_ids_out"] == len(images)
    _check_complete(str(tmp_path / "out"), images, reference, max_new=24)
