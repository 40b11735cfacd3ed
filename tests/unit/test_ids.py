"""The id check: repeats and nulls found across sources, the refusal names them, and the keep plan
keeps exactly the first row of each id however a source's rows arrive in batches."""

from __future__ import annotations

from pipeline.ids import check_ids, kept_rows, refusal


def test_unique_ids_are_clean():
    check = check_ids([("a.parquet", [1, 2]), ("b.parquet", [3])])
    assert check.clean and check.rows == 3 and check.keep == {}


def test_repeats_and_nulls_are_counted_and_named():
    check = check_ids([("a", ["x", "x", "y", None]), ("b", ["y", None, None, "z"])])
    assert check.duplicates == {"x": 2, "y": 2}
    assert check.nulls == {"a": 1, "b": 2}
    assert check.counts() == {"duplicate_id_rows_dropped": 2, "null_id_rows_dropped": 3}
    message = refusal(check, "m/")
    assert '"x" x2' in message and '"y" x2' in message and "3 row(s) have no id (1 in a, 2 in b)" in message
    assert "--dedupe first" in message


def test_the_keep_plan_keeps_the_first_row_of_each_id_across_batches_and_sources():
    sources = [("a", ["x", "y", "x", None, "w"]), ("b", ["y", "x", "v", "v"])]
    check = check_ids(sources)
    kept = []
    for name, ids in sources:
        plan, seen = check.keep.get(name, {}), {}
        for start in range(0, len(ids), 2):  # a source's rows come in several batches
            batch = ids[start:start + 2]
            kept += [(name, batch[i]) for i in kept_rows(batch, plan, seen)] if plan else [(name, v) for v in batch]
    assert kept == [("a", "x"), ("a", "y"), ("a", "w"), ("b", "v")]


def test_a_long_list_of_repeats_is_cut_in_the_message():
    check = check_ids([("a", [i // 2 for i in range(40)])])
    assert "20 id(s) appear on more than one row" in refusal(check, "a") and "and 12 more" in refusal(check, "a")
