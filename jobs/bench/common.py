"""What every benchmark suite shares: the machine's description, timing helpers and the writers.

Timings on shared machines drift, so a suite reports ratios against a baseline run in the same
process; the raw timings and the machine they came from are written next to them, so a figure
in the README can always be traced back to a file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "ray", "pillow", "numpy", "pyarrow", "flash-attn", "bitsandbytes")


def cpu_model() -> str:
    """The CPU's marketing name, which `platform.processor()` leaves empty on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def environment() -> dict[str, Any]:
    """The machine and software a result came from; the load average shows how shared it was."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu_name(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": versions,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def describe(env: dict[str, Any]) -> str:
    """One line naming the machine, for the Markdown report."""
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v)
    gpu = env["gpu"] or "no GPU"
    return (
        f"{env['cpu']}, {env['cores']} cores ({env['cores_usable']} usable), {env['memory_gib']} GiB, {gpu}; "
        f"Python {env['python']}; {libs}; load average {env['load_average_1m']} at start, "
        f"{env.get('load_average_1m_end', '?')} at end"
    )


@contextlib.contextmanager
def one_core() -> Iterator[int]:
    """Pin this process and torch to a single core, restoring both afterwards.

    A per-core figure is what a CPU worker of the batch job delivers, and it does not depend
    on how many idle cores the benchmark machine happens to have.
    """
    import torch

    allowed = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    core = min(allowed)
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    try:
        yield core
    finally:
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)


def seconds(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stream_events(url: str, body: bytes) -> Iterator[dict[str, Any]]:
    """The data events of one streamed chat request (a status other than 200, or an error event,
    raises): the one reader of the endpoint's stream for every serve benchmark."""
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[len(b"data: "):])
            if "error" in event:
                raise RuntimeError(f"{url} streamed an error: {event}")
            yield event


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation, as numpy computes it by default."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Target:
    """One claim of the README: a measured figure, its bound, and whether the run met it."""

    name: str
    value: float
    bound: float
    higher_is_better: bool

    def __post_init__(self) -> None:
        self.value = float(self.value)  # numpy scalars would reach the JSON report as strings

    @property
    def met(self) -> bool:
        return bool(self.value >= self.bound if self.higher_is_better else self.value <= self.bound)

    def describe(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        return f"{self.name} = {self.value:.3g} (target {op} {self.bound:g}): {'met' if self.met else 'NOT met'}"


@dataclass
class Plot:
    """A grouped bar chart: one group per category, one bar per series."""

    title: str
    ylabel: str
    categories: list[str]
    series: dict[str, list[float]]
    log_scale: bool = False


@dataclass
class Table:
    """A table of its own after the suite's main one, for a workload whose columns differ."""

    title: str
    header: list[str]
    rows: list[list[Any]]


@dataclass
class SuiteResult:
    """Everything a suite measured: the table for the README, the ratios, the raw timings."""

    suite: str
    title: str
    header: list[str]
    rows: list[list[Any]]
    ratios: dict[str, float]
    targets: list[Target] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plot: Plot | list[Plot] | None = None  # a list: panels side by side
    skipped: str | None = None
    tables: list[Table] = field(default_factory=list)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows] + [""]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown(result: SuiteResult, env: dict[str, Any]) -> str:
    """The suite's table, ratios and targets as Markdown, ready for the README."""
    lines = [f"### {result.title}", ""]
    if result.skipped:
        lines += [f"Skipped: {result.skipped}", ""]
    if result.rows:
        lines += _table(result.header, result.rows)
    for table in result.tables:
        lines += [f"#### {table.title}", ""] + _table(table.header, table.rows)
    if result.ratios:
        lines += ["| ratio | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.3g} |" for k, v in result.ratios.items()]
        lines.append("")
    lines += [f"- {t.describe()}" for t in result.targets]
    lines += [f"- {note}" for note in result.notes]
    lines += ["", f"Machine: {describe(env)}.", ""]
    return "\n".join(lines)


def plot_png(result: SuiteResult, path: Path) -> None:
    """The suite's chart (its panels side by side), or a panel with the reason it has none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [result.plot] if isinstance(result.plot, Plot) else result.plot or []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(8 * max(1, len(panels)), 4.5), dpi=100,
                             squeeze=False)
    if not panels:
        ax = axes[0][0]
        ax.axis("off")
        ax.text(0.5, 0.5, result.skipped or "nothing to plot", ha="center", va="center", wrap=True)
        ax.set_title(result.title)
    for ax, spec in zip(axes[0], panels):
        width = 0.8 / max(1, len(spec.series))
        for k, (name, values) in enumerate(spec.series.items()):
            xs = [i + (k - (len(spec.series) - 1) / 2) * width for i in range(len(spec.categories))]
            bars = ax.bar(xs, values, width, label=name)
            ax.bar_label(bars, labels=[_cell(float(v)) for v in values], fontsize=7)
        ax.set_xticks(range(len(spec.categories)), spec.categories)
        ax.set_ylabel(spec.ylabel)
        ax.set_title(spec.title)
        if spec.log_scale:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(result: SuiteResult, out_dir: str | os.PathLike, env: dict[str, Any]) -> dict[str, Path]:
    """Write `<suite>.json`, `<suite>.md` and `<suite>.png` into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{result.suite}.{ext}" for ext in ("json", "md", "png")}
    payload = {
        "suite": result.suite,
        "title": result.title,
        "skipped": result.skipped,
        "ratios": result.ratios,
        "targets": [{**asdict(t), "met": t.met} for t in result.targets],
        "table": {"header": result.header, "rows": result.rows},
        "tables": [asdict(t) for t in result.tables],
        "raw": result.raw,
        "notes": result.notes,
        "env": env,
    }
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(result, env))
    plot_png(result, paths["png"])
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None) -> Iterator[None]:
    """Join the Ray already initialised in this process, else start a local one and stop it after.

    A suite run from a test reuses the session's Ray; a suite run from the CLI owns its own.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",  # a new cluster, even when another user's is running on this machine
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    try:
        yield
    finally:
        if started:
            ray.shutdown()
