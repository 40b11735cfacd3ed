"""Output side: a guarded destination, a resumable output, honest counts, and a clean exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.write import (
    OutputExistsError,
    prepare_output,
    read_rows,
    reconcile_output,
    summarize,
    summary_table,
)

ROOT = Path(__file__).resolve().parents[2]


def _part(ids: list[str], errors: list[str | None]) -> pa.Table:
    return pa.table(
        {
            "id": ids,
            "response": [None if e else f"answer {i}" for i, e in zip(ids, errors, strict=True)],
            "error": errors,
            "num_input_tokens": [10] * len(ids),
            "num_output_tokens": [0 if e else 3 for e in errors],
        }
    )


@pytest.fixture
def output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(_part(["a", "b"], [None, "decode: not an image"]), out / "part-0.parquet")
    pq.write_table(_part(["c"], [None]), out / "part-1.parquet")
    return out


def test_an_output_with_results_is_refused_unless_overwritten_or_continued(output):
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_output(str(output), overwrite=False)
    prepare_output(str(output), overwrite=False, continuing=True)
    assert len(read_rows(str(output))) == 3
    (output / "_config.json").write_text("{}")
    (output / "_partial-part-9.parquet").write_bytes(b"cut")
    prepare_output(str(output), overwrite=True)
    assert list(output.iterdir()) == []


def test_overwrite_deletes_only_an_earlier_runs_output(output):
    """A folder holding a manifest or anyone's files is never emptied by --overwrite (it was: the
    manifest of `--input d/in.parquet --output d` went with it)."""
    before = sorted(p.name for p in output.iterdir())
    with pytest.raises(OutputExistsError, match="no _config.json"):
        prepare_output(str(output), overwrite=True)  # Parquet files, but no run of ours wrote them
    (output / "_config.json").write_text("{}")
    (output / "notes.txt").write_text("mine")
    (output / "sub").mkdir()
    (output / "sub" / "in.parquet").write_bytes(b"a manifest")
    with pytest.raises(OutputExistsError, match="notes.txt, sub/in.parquet"):
        prepare_output(str(output), overwrite=True)
    assert sorted(p.name for p in output.iterdir()) == sorted([*before, "_config.json", "notes.txt", "sub"])


def test_reconcile_keeps_answers_drops_errors_and_sets_aside_a_cut_file(output):
    whole = (output / "part-1.parquet").read_bytes()
    (output / "part-2.parquet").write_bytes(whole[: len(whole) // 2])  # a driver killed mid-write
    state = reconcile_output(str(output))
    assert sorted(state.done_ids) == ["a", "c"] and state.error_ids == ["b"]
    assert state.set_aside == ["part-2.parquet"] and (output / "_partial-part-2.parquet").exists()
    assert sorted(read_rows(str(output), ["id"]).column("id").to_pylist()) == ["a", "c"]


def test_summary_counts_what_the_output_holds(output):
    previous = reconcile_output(str(output))
    pq.write_table(_part(["b"], ["fetch: 404"]), output / "part-3.parquet")
    summary = summarize(str(output), rows_in=3, wall_s=2.0, previous=previous)
    assert summary["rows_out"] == summary["unique_ids_out"] == 3
    assert (summary["skipped"], summary["retried"], summary["done"]) == (2, 1, 1)
    assert (summary["ok"], summary["errors"], summary["errors_by_stage"]) == (2, 1, {"fetch": 1})
    assert (summary["input_tokens"], summary["output_tokens"], summary["rows_per_s"]) == (30, 6, 1.5)
    assert summary_table(summary).splitlines()[1].split() == ["rows_out", "3"]


def test_a_script_that_reads_the_output_exits_cleanly(tmp_path):
    """Reading through fsspec must not abort the interpreter at exit (it did, in 1 to 7 runs of 10)."""
    for i in range(12):
        pq.write_table(_part([f"{i}-{j}" for j in range(20)], [None] * 20), tmp_path / f"part-{i}.parquet")
    script = (
        "from pipeline.write import read_rows, reconcile_output;"
        f"print(read_rows({str(tmp_path)!r}).num_rows, len(reconcile_output({str(tmp_path)!r}).done_ids))"
    )
    for _ in range(8):  # the abort came at random, so one clean exit proves little
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stdout.split()) == (0, ["240", "240"]), done.stderr[-2000:]
