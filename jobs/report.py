"""Look at a finished run: one self-contained HTML page with its summary and configuration, charts
of answer lengths, generation times and label counts, its errors by stage, and a gallery of
sampled rows with thumbnails read from the run's input.

Usage: python -m jobs.report OUTPUT [--html FILE] [--sample N]
OUTPUT is the job's --output (a folder or an s3:// prefix). The page is written beside a local
output as OUTPUT.html, or for a remote one into the current folder, unless --html says where
(a local path or a URI); the command prints its path.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.report import read_run
from pipeline.report_html import render
from pipeline.report_images import ImageReader, thumbnails
from pipeline.storage import filesystem

DEFAULT_SAMPLE = 24


def default_html(output: str) -> str:
    """Beside a local output, never inside it (the job's --overwrite refuses a folder holding files
    it did not write); a remote output's page goes to the current folder, where it can be opened."""
    name = output.rstrip("/")
    return f"{name}.html" if "://" not in output else f"{name.rsplit('/', 1)[-1]}.html"


def make_report(output: str, html: str | None = None, sample: int = DEFAULT_SAMPLE,
                read_image: ImageReader | None = None) -> str:
    """Write the report of the run at `output`; returns where it went."""
    run = read_run(output, sample)
    page = render(run, thumbnails(run.config, list(dict.fromkeys(row.id for row in run.sample)), read_image))
    target = html or default_html(output)
    fs, path = filesystem(target)
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the run's output folder or s3:// prefix")
    parser.add_argument("--html", help="where to write the page (default: OUTPUT.html beside a local output)")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help="rows in the gallery (default: 24)")
    args = parser.parse_args(argv)
    if args.sample < 0:
        parser.error("--sample must be 0 or more")
    logging.basicConfig(level=logging.WARNING)
    try:
        print(make_report(args.output, args.html, args.sample))
    except FileNotFoundError as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
