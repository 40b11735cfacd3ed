"""The demo's manifest: held-out images, every question kind, and one two-image row."""

from __future__ import annotations

from jobs.demo import demo_manifest
from jobs import synthetic


def test_the_demo_asks_every_kind_about_held_out_images_plus_a_pair():
    table = demo_manifest(3)
    rows = table.to_pylist()
    assert len(rows) == 3 * len(synthetic.KINDS) + 1 == len({r["id"] for r in rows})
    single = rows[:-1]
    assert {r["kind"] for r in single} == set(synthetic.KINDS)
    assert all(len(r["images"]) == 1 and r["prompt"] in synthetic.QUESTIONS[r["kind"]] for r in single)
    heldout = {str(s) for s in synthetic.heldout_seeds(0, 3)}
    assert {r["id"].split("-")[0] for r in single} == heldout
    pair = rows[-1]
    assert pair["id"] == "pair" and pair["images"] == [single[0]["images"][0], single[-1]["images"][0]]
    assert pair["prompt"].count("<image>") == 2 and pair["kind"] is None
