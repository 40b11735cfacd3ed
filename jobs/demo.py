"""The end-to-end demo: a small generated dataset annotated by the real job on a local Ray.

Usage: python -m jobs.demo [--model DIR] [--workdir DIR] [--images N]

With no --model it uses the shipped shapes checkpoint (which answers shape and colour questions),
or builds a tiny random one if that is missing. The manifest mixes image sizes and aspects, asks
three kinds of question, and has one two-image row. A second run asks the shape questions again
with the shape names as choices: the answer as a label, with every label's probability. The first
run's report (python -m jobs.report) is written beside its output.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import synthetic
from jobs.report import make_report
from pipeline.answers import AnswerSpec, Constraint
from pipeline.config import AnnotateConfig, EngineConfig

SHIPPED = Path(__file__).resolve().parent.parent / "actors" / "checkpoints" / "tiny-shapes"


def demo_manifest(images: int) -> pa.Table:
    """Held-out synthetic images, three questions each, plus one row that compares two images."""
    single = synthetic.manifest(synthetic.heldout_seeds(0, images), kinds=synthetic.KINDS)
    pair = [single.column("image")[0].as_py(), single.column("image")[-1].as_py()]
    return pa.table(
        {
            "id": single.column("id").to_pylist() + ["pair"],
            "images": [[v] for v in single.column("image").to_pylist()] + [pair],
            "prompt": single.column("prompt").to_pylist() + ["<image> <image> Describe the image."],
            "kind": single.column("kind").to_pylist() + [None],
            "shape": single.column("shape").to_pylist() + [None],
            "colour": single.column("colour").to_pylist() + [None],
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the shipped shapes model)")
    parser.add_argument("--workdir", default="build/demo", help="where the manifest and output go")
    parser.add_argument("--images", type=int, default=8, help="number of generated images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or (str(SHIPPED) if (SHIPPED / "config.json").exists() else None)
    if model is None:
        from jobs.make_tiny_model import make_tiny_model

        model = str(make_tiny_model(work / "tiny-model"))
    manifest = demo_manifest(args.images)
    pq.write_table(manifest, work / "manifest.parquet")
    # The output's prompt is the formatted one; the table shows the question as it was asked.
    asked = dict(zip(manifest.column("id").to_pylist(), manifest.column("prompt").to_pylist(), strict=True))

    import ray

    from jobs.annotate import run
    from pipeline.write import read_rows, summary_table

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = AnnotateConfig(
        input=str(work / "manifest.parquet"),
        output=str(work / "output"),
        engine=EngineConfig(model=model, max_new_tokens=16),
        keep_columns=("kind", "shape", "colour"),
        overwrite=True,
        cpu_workers=1,
    )
    summary = run(cfg)
    rows = sorted(read_rows(cfg.output).to_pylist(), key=lambda r: r["id"])
    print(f"model: {model}\noutput: {cfg.output}\n")
    print(summary_table(summary))
    print(f"\n{'id':<20} {'question':<31} answer")
    for row in rows[:9] + [r for r in rows if r["id"] == "pair"]:
        question = asked[row["id"]].replace("<image>", "").strip()
        print(f"{row['id']:<20} {question[:30]:<31} {row['response']!r}")
    scored = [r for r in rows if r["kind"]]
    accuracy = synthetic.accuracy(scored)
    print("\n" + ", ".join(f"{k}: {v['correct']}/{v['total']} right" for k, v in sorted(accuracy.items())))
    labelled(work, model, args.images)
    ray.shutdown()
    print(f"\nreport: {make_report(cfg.output)}")
    return 0


def labelled(work: Path, model: str, images: int) -> None:
    """The shape questions with `--choices circle,square,triangle`: labels and their probabilities."""
    from jobs.annotate import run
    from pipeline.write import read_rows

    pq.write_table(synthetic.manifest(synthetic.heldout_seeds(0, images), kinds=("shape",)), work / "shapes.parquet")
    cfg = AnnotateConfig(
        input=str(work / "shapes.parquet"), output=str(work / "labels"), engine=EngineConfig(model=model),
        keep_columns=("shape",), overwrite=True, cpu_workers=1,
        answers=AnswerSpec(Constraint.choices(list(synthetic.SHAPES))),
    )
    run(cfg)
    rows = sorted(read_rows(cfg.output).to_pylist(), key=lambda r: r["id"])
    print(f"\nwith --choices {','.join(synthetic.SHAPES)} (output: {cfg.output})")
    print(f"{'id':<20} {'answer':<9} {'p(answer)':<10} truth")
    for row in rows:
        probs = dict(row["choice_probs"] or {})
        print(f"{row['id']:<20} {row['answer'] or row['error']!s:<9} {probs.get(row['answer'], 0.0):<10.3f} {row['shape']}")
    right = sum(r["answer"] == r["shape"] for r in rows)
    print(f"shape: {right}/{len(rows)} right")


if __name__ == "__main__":
    raise SystemExit(main())
