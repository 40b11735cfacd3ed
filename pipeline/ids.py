"""Every input row needs its own id: find duplicated and null ids before any work, and say which
rows `--dedupe first` leaves out.

The output is keyed on the id (resume, retry and the analyst's joins all use it), so two rows with
one id would overwrite each other's meaning, and a row without one can never be resumed. The job
reads every id at start-up (one column, cheap next to the images), refuses the input with the
offending ids named, or with `--dedupe first` keeps the first row of each id (in file order, then
row order) and leaves out the rest and the rows without an id, counting them in the summary.

The plan reads each file (or shard) in one task, in row order, so what a reader must leave out is
said per source as "keep the first K rows with this id" (`Keep`); K is 1 in the first source that
holds a duplicated id, 0 in every later one, and 0 for the null id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

SHOWN = 8  # offending ids named in a refusal

# source -> {id (None for the null id): how many rows with it this source keeps}
Keep = dict[str, dict[Any, int]]


@dataclass
class IdCheck:
    """What the ids of an input look like: duplicated ids with their counts, null-id rows per source,
    and for `--dedupe first` the rows each source keeps."""

    rows: int = 0
    duplicates: dict[Any, int] = field(default_factory=dict)
    nulls: dict[str, int] = field(default_factory=dict)
    keep: Keep = field(default_factory=dict)

    @property
    def dropped_duplicates(self) -> int:
        return sum(n - 1 for n in self.duplicates.values())

    @property
    def dropped_nulls(self) -> int:
        return sum(self.nulls.values())

    @property
    def clean(self) -> bool:
        return not self.duplicates and not self.nulls

    def counts(self) -> dict[str, int]:
        """The rows left out, for the job's summary."""
        return {"duplicate_id_rows_dropped": self.dropped_duplicates, "null_id_rows_dropped": self.dropped_nulls}


def check_ids(sources: Sequence[tuple[str, Sequence[Any]]]) -> IdCheck:
    """Duplicates and nulls over `(source name, ids in row order)` pairs, and the keep plan."""
    first_source: dict[Any, str] = {}
    counts: dict[Any, int] = {}
    check = IdCheck()
    for name, ids in sources:
        for value in ids:
            check.rows += 1
            if value is None:
                check.nulls[name] = check.nulls.get(name, 0) + 1
                continue
            counts[value] = counts.get(value, 0) + 1
            first_source.setdefault(value, name)
    check.duplicates = {v: n for v, n in counts.items() if n > 1}
    for name, _ in sources:
        if name in check.nulls:
            check.keep.setdefault(name, {})[None] = 0
    # A duplicated id is kept once, in the first source holding it; every other source keeps none.
    holders: dict[Any, list[str]] = {}
    if check.duplicates:
        wanted = set(check.duplicates)
        for name, ids in sources:
            for value in set(ids) & wanted:
                holders.setdefault(value, []).append(name)
    for value, names in holders.items():
        for name in names:
            check.keep.setdefault(name, {})[value] = 1 if name == first_source[value] else 0
    return check


def refusal(check: IdCheck, where: str) -> str:
    """The start-up message for an input whose ids are not unique, naming what to fix."""
    problems = []
    if check.duplicates:
        shown = sorted(check.duplicates.items(), key=lambda kv: (-kv[1], str(kv[0])))[:SHOWN]
        listed = ", ".join(f"{json.dumps(v, default=str)} x{n}" for v, n in shown)
        more = f" and {len(check.duplicates) - SHOWN} more" if len(check.duplicates) > SHOWN else ""
        problems.append(f"{len(check.duplicates)} id(s) appear on more than one row ({listed}{more})")
    if check.nulls:
        places = ", ".join(f"{n} in {name}" for name, n in list(check.nulls.items())[:SHOWN])
        problems.append(f"{check.dropped_nulls} row(s) have no id ({places})")
    return (
        f"input {where}: {'; '.join(problems)}. Every row needs its own id, since the output, --resume and "
        "--retry-errors are keyed on it: fix the input, or pass --dedupe first to keep the first row of each id "
        "and leave out the others and the rows without an id (counted in _summary.json)"
    )


def kept_rows(ids: Sequence[Any], keep: dict[Any, int], seen: dict[Any, int]) -> Iterator[int]:
    """Positions in `ids` a reader keeps, given its source's keep plan; `seen` carries the counts
    of kept ids across the batches of one source."""
    for i, value in enumerate(ids):
        if value in keep:
            if seen.get(value, 0) >= keep[value]:
                continue
            seen[value] = seen.get(value, 0) + 1
        yield i
