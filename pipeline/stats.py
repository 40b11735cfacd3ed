"""The job's own counters, kept by a small Ray actor on the driver's node while the plan runs.

Generation actors report their engines' running totals (prefill tokens, image encodings) and the
input stage counts the rows it lists, for inputs whose size is not known before the run.
"""

from __future__ import annotations

import ray

ENGINE_TOTALS = ("requests", "prefill_tokens_submitted", "prefill_tokens_computed", "prefill_tokens_matched",
                 "generated_tokens", "image_encodings_requested", "image_encodings_run", "isolated_steps",
                 "masked_rows", "mask_compute_s", "mask_apply_s", "matcher_advance_s", "constraint_compiles",
                 "constraint_cache_hits", "constraint_compile_s")


@ray.remote(num_cpus=0)
class JobStats:
    """Counters of one job: each generation actor reports its engine's running totals, and the
    input stage counts the rows it lists (for inputs whose size is not known up front)."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, int]] = {}
        self._rows_listed = 0

    def report(self, actor: str, stats: dict[str, int]) -> None:
        self._latest[actor] = stats

    def listed(self, rows: int) -> None:
        self._rows_listed += rows

    def rows_listed(self) -> int:
        return self._rows_listed

    def totals(self) -> dict[str, int]:
        totals = {k: sum(s.get(k, 0) for s in self._latest.values()) for k in ENGINE_TOTALS}
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in totals.items()}


def count_listed(stats_actor: str | None, rows: int) -> None:
    """Tell the job's counters that the input stage listed `rows` more rows."""
    if stats_actor:
        ray.get_actor(stats_actor).listed.remote(rows)


def stage_times(ds) -> dict[str, dict[str, float]]:
    """Seconds each stage of an executed plan spent, from Ray Data's own stats: wall time summed
    over its tasks, and CPU time (a stage's tasks overlap, so its sum can exceed the job's)."""
    out: dict[str, dict[str, float]] = {}

    def walk(summary) -> None:
        for parent in summary.parents:
            walk(parent)
        for op in summary.operators_stats:
            entry = out.setdefault(op.operator_name, {"wall_s": 0.0, "cpu_s": 0.0, "tasks": 0})
            if op.wall_time is not None:
                entry["wall_s"] += float(op.wall_time.sum)
                entry["tasks"] += int(op.wall_time.count)
            if op.cpu_time is not None:
                entry["cpu_s"] += float(op.cpu_time.sum)

    try:
        walk(ds.get_stats_summary())
    except Exception:  # stats are a report, never a reason to fail a finished job
        return {}
    return {name: {k: round(v, 3) for k, v in entry.items()} for name, entry in out.items()}
