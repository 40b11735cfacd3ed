"""A finished run, read for a person to look at: its summary and configuration, the shape of its
answers (lengths, generation times, label counts), its errors by stage with examples, and a
sample of rows.

A report must come back in seconds on a run of any size, so it reads only what it shows: the few
small columns the counts and charts need from every file (Parquet reads columns, not rows), the
text columns of the sampled rows alone (only the row groups that hold them), and, in
pipeline/report_images.py, the images of those rows alone. The HTML is pipeline/report_html.py.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.storage import exists, filesystem, join, read_json
from pipeline.write import CONFIG_FILE, SUMMARY_FILE, _data_files

STATS_COLUMNS = ("id", "error", "num_output_tokens", "generation_ms", "answer")
TEXT_COLUMNS = ("question_index", "question", "prompt", "response", "answer", "choice_probs", "error")
LABEL_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_boolean, pa.types.is_integer)
MAX_LABELS = 20  # more distinct values than this and an answer field is text, not a label
EXAMPLES_PER_STAGE = 5
BINS = 20


@dataclass(frozen=True)
class Histogram:
    """Rows per bin of one numeric column; bin i holds values in [edges[i], edges[i + 1]), the last
    bin its upper edge too. Integer columns with a small range get one bin per value (`discrete`)."""

    column: str
    edges: list[float]
    counts: list[int]
    median: float | None
    p90: float | None
    maximum: float | None
    discrete: bool = False

    @property
    def rows(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class LabelCounts:
    """How often each value of one label-like answer field occurs (`answer`, or `answer.colour`
    for a struct's field), most frequent first; `missing` rows have no value (errors, nulls)."""

    field: str
    counts: list[tuple[Any, int]]
    missing: int


@dataclass(frozen=True)
class ErrorGroup:
    """The rows that failed at one stage: how many, and the first few (id, error) as examples."""

    stage: str
    count: int
    examples: list[tuple[Any, str]]


@dataclass(frozen=True)
class SampledRow:
    """One gallery row: what was asked (the question, else the formatted prompt) and answered."""

    id: Any
    question_index: int | None
    asked: str | None
    response: str | None
    answer: Any
    choice_probs: dict[str, float] | None
    error: str | None


@dataclass(frozen=True)
class RunReport:
    """Everything a report shows except the thumbnails (which need the input, not the output)."""

    output: str
    config: dict[str, Any] | None
    summary: dict[str, Any] | None
    rows: int
    tokens: Histogram
    generation_ms: Histogram
    labels: list[LabelCounts]
    errors: list[ErrorGroup]
    sample: list[SampledRow]


def histogram(column: str, values: np.ndarray, bins: int = BINS) -> Histogram:
    """Equal-width bins over the values' range (one per value when integers span fewer than `bins`)."""
    if values.size == 0:
        return Histogram(column, [], [], None, None, None)
    low, high = float(values.min()), float(values.max())
    discrete = bool(np.issubdtype(values.dtype, np.integer) and high - low < bins)
    if discrete:
        edges = np.arange(low, high + 2)
        counts = np.bincount((values - int(low)).astype(np.int64), minlength=len(edges) - 1)
    else:
        counts, edges = np.histogram(values, bins=bins if high > low else 1, range=(low, high if high > low else low + 1))
    median, p90 = np.percentile(values, [50, 90])
    return Histogram(column, [float(e) for e in edges], [int(c) for c in counts], float(median), float(p90), high,
                     discrete)


def label_fields(column: pa.ChunkedArray, name: str = "answer") -> dict[str, pa.ChunkedArray]:
    """The label-typed leaves of an answer column (string, bool or integer), a struct's fields by
    dotted name; lists, floats and maps are not labels."""
    typ = column.type
    if pa.types.is_struct(typ):
        fields = [chunk.flatten() for chunk in column.chunks]  # a child is null where its struct is
        out: dict[str, pa.ChunkedArray] = {}
        for i, field in enumerate(typ):
            child = pa.chunked_array([chunk[i] for chunk in fields], field.type)
            out.update(label_fields(child, f"{name}.{field.name}"))
        return out
    return {name: column} if any(test(typ) for test in LABEL_TYPES) else {}


def label_counts(column: pa.ChunkedArray, name: str = "answer", max_labels: int = MAX_LABELS) -> list[LabelCounts]:
    """Counts per value of each label-like field that has at most `max_labels` distinct values."""
    out = []
    for field, values in label_fields(column, name).items():
        counted = pc.value_counts(values.drop_null())
        if not 0 < len(counted) <= max_labels:
            continue
        pairs = sorted(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()),
                       key=lambda p: (-p[1], str(p[0])))
        out.append(LabelCounts(field, pairs, values.null_count))
    return out


def error_groups(ids: pa.ChunkedArray, errors: pa.ChunkedArray, examples: int = EXAMPLES_PER_STAGE) -> list[ErrorGroup]:
    """Errors by their stage (the text before the first colon), most frequent first."""
    failed = pc.is_valid(errors)
    counts: Counter[str] = Counter()
    shown: dict[str, list[tuple[Any, str]]] = {}
    for row_id, error in zip(ids.filter(failed).to_pylist(), errors.filter(failed).to_pylist()):
        stage = error.split(":", 1)[0]
        counts[stage] += 1
        if len(shown.setdefault(stage, [])) < examples:
            shown[stage].append((row_id, error))
    return [ErrorGroup(stage, n, shown[stage]) for stage, n in sorted(counts.items(), key=lambda p: (-p[1], p[0]))]


def sample_positions(rows: int, n: int, seed: int = 0) -> list[int]:
    """`n` row positions out of `rows`, the same ones on every call (a report can be re-made and compared)."""
    return sorted(random.Random(seed).sample(range(rows), min(n, rows)))


def take_rows(parquet: pq.ParquetFile, positions: list[int], columns: list[str]) -> pa.Table:
    """Rows by position (sorted), reading only the row groups that hold them."""
    parts, start = [], 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        inside = [p - start for p in positions if start <= p < start + size]
        if inside:
            table = parquet.read_row_group(group, columns=columns, use_threads=False)
            parts.append(table.take(pa.array(inside, pa.int64())))
        start += size
    if not parts:
        return parquet.schema_arrow.empty_table().select(columns)
    return pa.concat_tables(parts)


def _read_stats(fs: Any, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = [c for c in STATS_COLUMNS if c in parquet.schema_arrow.names]
        return parquet.read(columns=names, use_threads=False)


def _read_sample(fs: Any, path: str, positions: list[int]) -> list[SampledRow]:
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        rows = take_rows(parquet, positions, ["id"] + [c for c in TEXT_COLUMNS if c in parquet.schema_arrow.names])
    return [SampledRow(r["id"], r.get("question_index"), r.get("question") or r.get("prompt"), r.get("response"),
                       r.get("answer"), dict(r["choice_probs"]) if r.get("choice_probs") else None, r.get("error"))
            for r in rows.to_pylist()]


def _optional_json(uri: str) -> dict[str, Any] | None:
    return read_json(uri) if exists(uri) else None


def _answered(table: pa.Table, column: str) -> np.ndarray:
    """A numeric column over the rows without an error (a failed row generated nothing to chart)."""
    if column not in table.column_names:
        return np.array([])
    values = table.filter(pc.is_null(table.column("error"))).column(column).drop_null()
    return values.to_numpy()


def read_run(output: str, sample: int, seed: int = 0) -> RunReport:
    """The report's data for the run at `output` (a local folder or an `s3://` prefix)."""
    fs, path = filesystem(output)
    files = _data_files(fs, path)
    if not files and not exists(join(output, CONFIG_FILE)):
        raise FileNotFoundError(f"{output} holds no run: no Parquet files and no {CONFIG_FILE}")
    workers = max(1, min(16, len(files)))
    with ThreadPoolExecutor(workers) as pool:
        stats = list(pool.map(lambda f: _read_stats(fs, f), files))
    tables = [t for t in stats if t.num_rows]
    table = pa.concat_tables(tables, promote_options="default") if tables else pa.table(
        {"id": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    labels = label_counts(table.column("answer")) if "answer" in table.column_names else []
    starts = list(np.cumsum([0] + [t.num_rows for t in stats]))
    by_file: dict[int, list[int]] = {}
    for position in sample_positions(table.num_rows, sample, seed):
        index = bisect.bisect_right(starts, position) - 1
        by_file.setdefault(index, []).append(position - starts[index])
    with ThreadPoolExecutor(workers) as pool:
        sampled = [row for rows in pool.map(lambda item: _read_sample(fs, files[item[0]], item[1]), by_file.items())
                   for row in rows]
    sampled.sort(key=lambda r: (r.id, r.question_index or 0))
    return RunReport(
        output=output,
        config=_optional_json(join(output, CONFIG_FILE)),
        summary=_optional_json(join(output, SUMMARY_FILE)),
        rows=table.num_rows,
        tokens=histogram("num_output_tokens", _answered(table, "num_output_tokens")),
        generation_ms=histogram("generation_ms", _answered(table, "generation_ms")),
        labels=labels,
        errors=error_groups(table.column("id"), table.column("error")),
        sample=sampled,
    )
