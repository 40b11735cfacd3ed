"""The shipped shapes checkpoint answers right through the real batch job.

Right answers are what reveal an image matched with the wrong row, tiles in the wrong order or
orientation, or a broken crop; comparing with the reference cannot, since both would agree.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import annotate
from jobs.shapes_eval import TRUTH_COLUMNS, read_results
from jobs import synthetic
from pipeline.answers import AnswerSpec, Constraint
from pipeline.config import AnnotateConfig, EngineConfig
from pipeline.write import read_rows

CHECKPOINT = Path(__file__).resolve().parents[2] / "actors" / "checkpoints" / "tiny-shapes"
IMAGES = 32
# Held-out seeds of their own: neither training nor the README's evaluation uses them.
FIRST = 10_000
MIN_ACCURACY = 0.85
MIN_FAST_AGREEMENT = 0.98


def annotate_once(manifest: Path, output: Path, fast_decode: bool, answers: AnswerSpec = AnswerSpec(),
                  rows: int = 2 * IMAGES) -> list[dict]:
    cfg = AnnotateConfig(
        input=str(manifest),
        output=str(output),
        engine=EngineConfig(model=str(CHECKPOINT), max_new_tokens=8),
        keep_columns=TRUTH_COLUMNS,
        batch_size=16,
        cpu_workers=2,
        fast_decode=fast_decode,
        answers=answers,
    )
    summary = annotate.run(cfg)
    assert summary["rows_out"] == summary["ok"] == rows
    return read_results(str(output))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Every image a JPEG (240-1000 px), so `--fast-decode` has work: the model's largest grid is 192 px."""
    path = tmp_path_factory.mktemp("shapes") / "manifest.parquet"
    pq.write_table(synthetic.manifest(synthetic.heldout_seeds(FIRST, IMAGES), fmt="JPEG"), path)
    return path


@pytest.fixture(scope="module")
def results(ray_local, manifest) -> list[dict]:
    return annotate_once(manifest, manifest.parent / "exact", fast_decode=False)


def test_the_checkpoint_is_small_enough_to_commit():
    files = list(CHECKPOINT.iterdir())
    assert sum(f.stat().st_size for f in files) <= 10 * 1024 * 1024
    assert all(f.stat().st_size <= 2 * 1024 * 1024 for f in files if f.name != "model.safetensors")


@pytest.mark.parametrize("kind", ["shape", "colour"])
def test_heldout_shapes_and_colours_are_named_right(results, kind):
    """Colours and shapes differ from image to image, so a row matched with another row's image,
    tiles put together in the wrong order or orientation, or a broken crop fail here."""
    accuracy = synthetic.accuracy(results)[kind]
    wrong = [(r["id"], r["response"]) for r in results if r["kind"] == kind
             and not synthetic.is_correct(kind, r["response"], r["shape"], r["colour"])]
    assert accuracy["total"] == IMAGES
    assert accuracy["accuracy"] >= MIN_ACCURACY, wrong


def test_fast_decode_gives_the_same_answers(results, manifest):
    """`--fast-decode` decodes these JPEGs at a reduced DCT scale; the answers must not change."""
    fast = {r["id"]: r["response"] for r in annotate_once(manifest, manifest.parent / "fast", fast_decode=True)}
    exact = {r["id"]: r["response"] for r in results}
    assert fast.keys() == exact.keys()
    differing = [(k, exact[k], fast[k]) for k in exact if exact[k] != fast[k]]
    assert 1 - len(differing) / len(exact) >= MIN_FAST_AGREEMENT, differing


def test_choices_name_the_shapes_at_least_as_well_as_free_text(results, tmp_path):
    """The same held-out shape questions with `--choices circle,square,triangle`: every answer is a
    label, the most probable one as a whole, and no fewer are right than in free text."""
    manifest = tmp_path / "shapes.parquet"
    pq.write_table(synthetic.manifest(synthetic.heldout_seeds(FIRST, IMAGES), kinds=("shape",), fmt="JPEG"), manifest)
    answers = AnswerSpec(Constraint.choices(list(synthetic.SHAPES)))
    annotate_once(manifest, tmp_path / "choices", fast_decode=False, answers=answers, rows=IMAGES)
    rows = read_rows(str(tmp_path / "choices"), ["answer", "choice_probs", "shape"]).to_pylist()
    for row in rows:
        probs = dict(row["choice_probs"])
        assert row["answer"] == max(probs, key=probs.get) and sorted(probs) == sorted(synthetic.SHAPES)
    labelled = sum(row["answer"] == row["shape"] for row in rows)
    assert labelled >= synthetic.accuracy(results)["shape"]["correct"]
