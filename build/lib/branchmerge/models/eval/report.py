"""Results report of the pipeline: one table of per-domain scores for every model (base, each branch, merged, rl).

``results`` maps model name -> domain -> score (e.g. greedy pass@1). Columns are the domains (in order of first
appearance), then ``overall`` = the unweighted mean over the model's domains, then any ``extra`` columns
(``extra`` maps model name -> column -> value, e.g. ``{"base": {"mean_completion_tokens": 87.2}}``).
Missing cells show as "-" (None in ``table_rows``). ``intervals`` (model -> column -> (low, high), a 95 %
confidence interval) adds "[low, high]" to a cell and error bars to the chart. No Prefect here: ``table_rows``
feeds the flow's ``create_table_artifact``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

OVERALL = "overall"
MODEL = "model"
DIGITS = 3
MISSING = "-"

Results = Mapping[str, Mapping[str, float]]
Extra = Mapping[str, Mapping[str, float]] | None
Intervals = Mapping[str, Mapping[str, Sequence[float]]] | None


def domains_of(results: Results) -> list[str]:
    """Domains in order of first appearance over the models."""
    seen: dict[str, None] = {}
    for scores in results.values():
        for d in scores:
            if d == OVERALL:
                raise ValueError(f"domain name {OVERALL!r} is reserved for the mean column of the report")
            seen.setdefault(d, None)
    return list(seen)


def _extra_columns(extra: Extra, domains: list[str]) -> list[str]:
    cols: dict[str, None] = {}
    for values in (extra or {}).values():
        for c in values:
            if c in domains or c in (OVERALL, MODEL):
                raise ValueError(f"extra column {c!r} clashes with a domain or with {MODEL!r}/{OVERALL!r}")
            cols.setdefault(c, None)
    return list(cols)


def overall_score(scores: Mapping[str, float]) -> float | None:
    """Unweighted mean of a model's domain scores (None when it has none)."""
    vals = [float(v) for v in scores.values() if v is not None and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else None


def table_rows(results: Results, extra: Extra = None) -> list[dict[str, Any]]:
    """One dict per model: {"model": name, <domain>: score, ..., "overall": mean, <extra col>: value}.

    Values are floats (unrounded) or None where missing: ready for a Prefect table artifact or JSON.
    """
    if not results:
        raise ValueError("report: results is empty (expected model -> domain -> score)")
    domains = domains_of(results)
    extra_cols = _extra_columns(extra, domains)
    rows = []
    for model, scores in results.items():
        row: dict[str, Any] = {MODEL: model}
        for d in domains:
            v = scores.get(d)
            row[d] = None if v is None or math.isnan(float(v)) else float(v)
        row[OVERALL] = overall_score({d: row[d] for d in domains if row[d] is not None})
        for c in extra_cols:
            v = (extra or {}).get(model, {}).get(c)
            row[c] = None if v is None else float(v)
        rows.append(row)
    return rows


def _cells(results: Results, extra: Extra, intervals: Intervals = None) -> tuple[list[str], list[list[str]]]:
    rows = table_rows(results, extra)
    header = list(rows[0])

    def cell(model: str, column: str, value: float | None) -> str:
        if value is None:
            return MISSING
        ci = (intervals or {}).get(model, {}).get(column)
        return f"{value:.{DIGITS}f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci is not None else "")

    body = [[str(r[MODEL])] + [cell(r[MODEL], c, r[c]) for c in header[1:]] for r in rows]
    return header, body


def results_table_markdown(results: Results, extra: Extra = None, intervals: Intervals = None) -> str:
    """GitHub Markdown table: rows = models, columns = domains + overall (+ extra); 3 decimals (+ intervals)."""
    header, body = _cells(results, extra, intervals)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def results_table_plain(results: Results, extra: Extra = None, intervals: Intervals = None) -> str:
    """Aligned plain-text table for logs and the console (model column left, numbers right-aligned)."""
    header, body = _cells(results, extra, intervals)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, body)]) + "\n"


def results_table_rich(results: Results, extra: Extra = None, *, title: str | None = None) -> str:
    """The table rendered by ``rich`` (box drawing, no colour codes) as a string; plain table if rich is absent."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return results_table_plain(results, extra)
    header, body = _cells(results, extra)
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", style="bold" if h == OVERALL else None)
    for row in body:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=max(80, sum(len(h) + 3 for h in header) + 40), color_system=None).print(table)
    return buf.getvalue()


def results_bar_chart(results: Results, path: str | Path, *, title: str | None = None,
                      intervals: Intervals = None) -> Path:
    """Grouped bar chart (PNG): one group per domain plus ``overall``, one bar colour per model; error bars from
    ``intervals``."""
    # Figure + Agg canvas, no pyplot: no global backend state, safe in worker threads.
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = table_rows(results)
    groups = [*domains_of(results), OVERALL]
    n_models = len(rows)
    width = 0.8 / n_models
    x = np.arange(len(groups))
    cmap = colormaps["tab10" if n_models <= 10 else "tab20"]
    fig = Figure(figsize=(max(6.0, 1.0 + 0.35 * len(groups) * max(n_models, 2)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        vals = [np.nan if row[g] is None else row[g] for g in groups]
        cis = [(intervals or {}).get(row[MODEL], {}).get(g) for g in groups]
        yerr = None
        if any(ci is not None for ci in cis):
            yerr = np.array([[0.0, 0.0] if ci is None or np.isnan(v) else [max(0.0, v - ci[0]), max(0.0, ci[1] - v)]
                             for v, ci in zip(vals, cis)]).T  # (rounding can put a bound a hair past the value)
        ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=row[MODEL], color=cmap(i % cmap.N), yerr=yerr,
               capsize=2, error_kw={"elinewidth": 0.8})
    rotate = len(groups) > 6
    ax.set_xticks(x, groups, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel("score")
    top = max([row[g] for row in rows for g in groups if row[g] is not None] + [0.0])
    ax.set_ylim(0, 1.05 if top <= 1.0 else top * 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=min(n_models, 4), loc="upper left", bbox_to_anchor=(0, -0.12))
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path
