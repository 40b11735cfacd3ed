"""A run's report as one self-contained HTML page: it makes no network request at all (images are
data URLs, charts are inline SVG and CSS bars, styles are inline, fonts are the system's, and
there is no script), so it can be mailed, archived or opened offline and shows the same.

Every number taken from the run carries its exact value in a `data-` attribute as JSON (the
summary's `data-summary` path and `data-value`, a chart bar's `data-count`, an error stage's
`data-stage` and `data-count`, a gallery row's `data-id`), so a test or a script reads the page
without parsing its formatting.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from pipeline.report import ErrorGroup, Histogram, LabelCounts, RunReport, SampledRow
from pipeline.report_images import THUMBNAIL_PX, Thumbnail

CHART_W, CHART_H = 480, 140
LONG_TEXT = 600  # characters of a prompt or response shown in the gallery

PLACEHOLDER = "data:image/svg+xml;base64," + base64.b64encode(
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{THUMBNAIL_PX}" height="{THUMBNAIL_PX * 3 // 4}">'
    '<rect x="1" y="1" width="99%" height="98%" fill="#f4f4f4" stroke="#b00" stroke-dasharray="6 4"/>'
    '<text x="50%" y="50%" text-anchor="middle" dominant-baseline="middle" font-family="sans-serif" '
    'font-size="14" fill="#b00">no image</text></svg>'.encode()).decode()

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.4em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table.kv td, table.kv th { text-align: left; padding: 1px 12px 1px 0; font-size: 0.9em; }
table.kv th { font-weight: normal; color: #555; max-width: 28em; overflow-wrap: anywhere; }
.charts { display: flex; flex-wrap: wrap; gap: 2em; } .chart p { margin: 0.2em 0; font-size: 0.85em; }
svg.histogram rect { fill: #4a7bb7; } svg.histogram text { font-size: 11px; fill: #444; }
.bars { margin-bottom: 1em; } .bar { display: flex; align-items: center; gap: 0.5em; font-size: 0.9em; }
.bar .label { width: 12em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; text-align: right; }
.bar .fill { background: #4a7bb7; height: 1em; } .bar .n { color: #555; }
.stage h3 { margin-bottom: 0.2em; } .stage table { font-size: 0.85em; border-collapse: collapse; }
.stage td { border-top: 1px solid #eee; padding: 2px 8px 2px 0; vertical-align: top; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }
figure.row { margin: 0; padding: 0.6em; border: 1px solid #ddd; border-radius: 4px; font-size: 0.85em; }
figure.row.failed { border-color: #d88; background: #fff8f8; }
figure.row img { display: block; max-width: 160px; max-height: 160px; margin-bottom: 0.4em; }
.missing, .error { color: #b00; } .asked { color: #555; } .id { font-family: monospace; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0.2em 0; font-size: 0.95em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json_attr(value: Any) -> str:
    """A value as JSON text inside a quoted attribute (read back exactly with json.loads)."""
    return _e(json.dumps(value, default=str, sort_keys=True))


def _short(text: str | None) -> str:
    if text is None:
        return ""
    return text if len(text) <= LONG_TEXT else text[:LONG_TEXT] + f" … ({len(text)} characters)"


def flatten(payload: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Nested dicts to (key path, leaf) pairs, in order; lists and scalars are leaves."""
    out: list[tuple[tuple[str, ...], Any]] = []
    for key, value in payload.items():
        if isinstance(value, dict) and value:
            out += flatten(value, (*path, key))
        else:
            out.append(((*path, key), value))
    return out


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _key_values(payload: dict[str, Any], attribute: str) -> str:
    rows = "".join(
        f'<tr><th>{_e(".".join(path))}</th><td {attribute}="{_json_attr(list(path))}" '
        f'data-value="{_json_attr(value)}">{_e(_shown(value))}</td></tr>'
        for path, value in flatten(payload))
    return f'<table class="kv">{rows}</table>'


def _rows(n: int) -> str:
    return f"{n:,} row" if n == 1 else f"{n:,} rows"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:,.4g}"


def histogram_svg(chart: Histogram, title: str) -> str:
    """One histogram as inline SVG bars, its axis ends and the middle figures below it."""
    if not chart.counts:
        return f'<div class="chart" data-histogram="{_e(chart.column)}" data-rows="0"><h3>{_e(title)}</h3>' \
               "<p>no answered rows</p></div>"
    top = max(chart.counts)
    width = min(CHART_W / len(chart.counts), 40.0) if chart.discrete else CHART_W / len(chart.counts)
    bars, labels = [], []
    for i, count in enumerate(chart.counts):
        height = (CHART_H - 20) * count / top if top else 0
        low, high = chart.edges[i], chart.edges[i + 1]
        shown = _number(low) if chart.discrete else f"{_number(low)} to {_number(high)}"
        bars.append(f'<rect x="{i * width + 1:.1f}" y="{CHART_H - 20 - height:.1f}" width="{max(width - 2, 1):.1f}" '
                    f'height="{height:.1f}" data-count="{count}"><title>{shown}: {_rows(count)}</title></rect>')
        if chart.discrete:
            labels.append(f'<text x="{(i + 0.5) * width:.1f}" y="{CHART_H - 5}" text-anchor="middle">{shown}</text>')
    if not chart.discrete:  # bins of a continuous range: its two ends
        labels = [f'<text x="0" y="{CHART_H - 5}">{_number(chart.edges[0])}</text>',
                  f'<text x="{CHART_W}" y="{CHART_H - 5}" text-anchor="end">{_number(chart.edges[-1])}</text>']
    return (f'<div class="chart" data-histogram="{_e(chart.column)}" data-rows="{chart.rows}"><h3>{_e(title)}</h3>'
            f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
            f'viewBox="0 0 {CHART_W} {CHART_H}">{"".join(bars)}{"".join(labels)}</svg>'
            f"<p>{_rows(chart.rows)} answered · median {_number(chart.median)} · 90th percentile "
            f"{_number(chart.p90)} · max {_number(chart.maximum)}</p></div>")


def label_bars(labels: LabelCounts) -> str:
    """One answer field's value counts as CSS bars."""
    top = max(n for _, n in labels.counts)
    bars = "".join(
        f'<div class="bar" data-field="{_e(labels.field)}" data-value="{_json_attr(value)}" data-count="{n}">'
        f'<span class="label">{_e(_shown(value))}</span><span class="fill" style="width: {30 * n / top:.1f}em">'
        f'</span><span class="n">{n}</span></div>'
        for value, n in labels.counts)
    missing = f"<p>{_rows(labels.missing)} without a value</p>" if labels.missing else ""
    return f'<div class="bars"><h3>{_e(labels.field)}</h3>{bars}{missing}</div>'


def error_section(groups: list[ErrorGroup]) -> str:
    if not groups:
        return "<p>No row failed.</p>"
    out = []
    for group in groups:
        rows = "".join(f'<tr data-id="{_json_attr(row_id)}"><td class="id">{_e(row_id)}</td>'
                       f'<td class="error">{_e(error)}</td></tr>' for row_id, error in group.examples)
        more = f"<p>and {_rows(group.count - len(group.examples))} more</p>" if group.count > len(group.examples) else ""
        out.append(f'<div class="stage" data-stage="{_e(group.stage)}" data-count="{group.count}">'
                   f"<h3>{_e(group.stage)}: {_rows(group.count)}</h3><table>{rows}</table>{more}</div>")
    return "".join(out)


def gallery_row(row: SampledRow, thumb: Thumbnail) -> str:
    """One sampled row: its thumbnail (or a placeholder saying why there is none) and its text."""
    if thumb.url is not None:
        image = f'<img class="thumb" src="{thumb.url}" alt="{_e(row.id)}">'
    else:
        image = (f'<img class="placeholder" src="{PLACEHOLDER}" alt="no image">'
                 f'<div class="missing">image unavailable: {_e(thumb.missing)}</div>')
    more = f"<div>first of {thumb.images} images</div>" if thumb.images > 1 else ""
    question = f" · question {row.question_index}" if row.question_index is not None else ""
    parts = [f'<div class="id">{_e(row.id)}{question}</div>', f'<pre class="asked">{_e(_short(row.asked))}</pre>']
    if row.error is not None:
        parts.append(f'<pre class="error">{_e(row.error)}</pre>')
    else:
        parts.append(f'<pre class="response">{_e(_short(row.response))}</pre>')
        if row.answer is not None and _shown(row.answer) != row.response:
            parts.append(f'<div>answer: <code>{_e(_shown(row.answer))}</code></div>')
        if row.choice_probs:
            probs = ", ".join(f"{_e(k)} {v:.2f}" for k, v in sorted(row.choice_probs.items(), key=lambda p: -p[1]))
            parts.append(f"<div>{probs}</div>")
    failed = " failed" if row.error is not None else ""
    stage = f' data-stage="{_e(row.error.split(":", 1)[0])}"' if row.error is not None else ""
    return (f'<figure class="row{failed}" data-id="{_json_attr(row.id)}"{stage}>{image}{more}'
            f'<figcaption>{"".join(parts)}</figcaption></figure>')


def render(report: RunReport, thumbs: dict[Any, Thumbnail]) -> str:
    """The whole page."""
    model = (report.config or {}).get("engine", {}).get("model")
    summary = (_key_values(report.summary, "data-summary") if report.summary is not None
               else "<p>No _summary.json: the run did not finish (the figures below count what it wrote).</p>")
    labels = "".join(label_bars(labels) for labels in report.labels) or \
        "<p>No label-like answers (the run had no --choices, or its answers take many values).</p>"
    gallery = "".join(gallery_row(row, thumbs[row.id]) for row in report.sample)
    config = (_key_values(report.config, "data-config") if report.config is not None
              else "<p>No _config.json.</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Run report: {_e(report.output)}</title>
<style>{STYLE}</style></head><body>
<h1>Run report: <span class="id">{_e(report.output)}</span></h1>
<p>{_rows(report.rows)}{f" · model {_e(model)}" if model else ""}</p>
<section id="summary"><h2>Summary</h2>{summary}</section>
<section id="charts"><h2>Answers</h2><div class="charts">
{histogram_svg(report.tokens, "Answer length (num_output_tokens)")}
{histogram_svg(report.generation_ms, "Generation time per row (generation_ms)")}
</div>{labels}</section>
<section id="errors"><h2>Errors by stage</h2>{error_section(report.errors)}</section>
<section id="gallery"><h2>A sample of {_rows(len(report.sample))}</h2><div class="gallery">{gallery}</div></section>
<section id="config"><h2>Configuration</h2>{config}</section>
</body></html>
"""
