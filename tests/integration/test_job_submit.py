"""`ray job submit` of the annotation job against a `ray start --head` cluster on loopback."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port
from tests.helpers import encode, noise_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def head_node(tmp_path):
    """A one-node cluster started like a user would, from the project's virtualenv."""
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        # Ray's token auth: the cluster and the submitting client share one token.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    cmd = [
        str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--num-cpus", "3", "--include-dashboard", "true", "--disable-usage-stats",
        # Ports of their own: another Ray on this machine (the tests' local one) holds the defaults.
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
        "--temp-dir", tempfile.mkdtemp(prefix="ray-"),  # short: Ray's socket paths must fit 107 bytes
    ]
    with open(tmp_path / "ray-start.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
            break
        except urllib.error.HTTPError:  # answering at all (401 when token auth is on) means it is up
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError((tmp_path / "ray-start.log").read_text()[-3000:])
            time.sleep(1)
    yield address, env
    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_ray_job_submit_writes_a_complete_output(head_node, tiny_model, tmp_path):
    address, env = head_node
    ids = [f"img-{i}" for i in range(6)]
    images = [encode(noise_image(40 + 25 * i, 90 - 9 * i, seed=i)) for i in range(6)]
    pq.write_table(pa.table({"id": ids, "image": images}), tmp_path / "manifest.parquet")
    out = tmp_path / "out"
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
        "--working-dir", str(ROOT), "--",
        "python", "-m", "jobs.annotate", "--input", str(tmp_path / "manifest.parquet"),
        "--output", str(out), "--model", tiny_model, "--max-new-tokens", "4", "--cpu-workers", "1",
    ]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        # The dashboard answers before the node's job agent has registered; until then it refuses.
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert "rows_out" in done.stdout
    table = pads.dataset(out, format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == ids
    assert table.column("error").null_count == len(ids)
