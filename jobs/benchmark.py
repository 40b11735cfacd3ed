"""Measure the project's speed claims side by side with their baselines; write JSON, Markdown, PNG.

Usage: python -m jobs.benchmark {preprocess,pipeline,engine,serve,gpu,peers,all} [--out DIR] [--quick]
       python -m jobs.benchmark peers --vllm-python PATH [--ray-data-llm-python PATH]

Every figure is a ratio against a baseline run in the same process, so drift on a shared
machine cancels out; `--quick` runs a small version of a suite as a smoke test.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os

SUITES = ("preprocess", "pipeline", "engine", "serve", "gpu", "peers")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=(*SUITES, "all"), help="which suite to run ('all': one after another)")
    p.add_argument("--out", default="bench-out", help="directory for SUITE.json, SUITE.md and SUITE.png")
    p.add_argument("--quick", action="store_true", help="a small, fast run (a smoke test, not a measurement)")
    p.add_argument("--vllm-python", help="peers: the python of an environment where `import vllm` works")
    p.add_argument("--ray-data-llm-python", help="peers: the python of an environment with Ray Data LLM and vLLM")
    return p


def run_suite(name: str, out: str, quick: bool, **options: str | None) -> dict:
    """Run one suite, write its three files and return what was written, for the CLI's report.

    `options` (the peers' Pythons) reach the suites whose `run` takes them."""
    from jobs.bench.common import environment, write

    env = environment()
    run = importlib.import_module(f"jobs.bench.{name}").run
    accepted = {k: v for k, v in options.items() if k in inspect.signature(run).parameters}
    result = run(quick, **accepted)
    env["load_average_1m_end"] = round(os.getloadavg()[0], 2)  # other users' load shows up here too
    paths = write(result, out, env)
    return {"result": result, "paths": paths}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    for name in SUITES if args.suite == "all" else (args.suite,):
        done = run_suite(name, args.out, args.quick, vllm_python=args.vllm_python,
                         ray_data_llm_python=args.ray_data_llm_python)
        result = done["result"]
        print(f"{name}: {result.skipped}" if result.skipped else f"{name}:")
        for key, value in result.ratios.items():
            print(f"  {key} = {value:.3g}")
        for target in result.targets:
            print(f"  {target.describe()}")
        print(f"  wrote {', '.join(str(p) for p in done['paths'].values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
