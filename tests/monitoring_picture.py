"""The deploy kit's Grafana dashboard drawn with matplotlib from a real Prometheus's range queries:
how docs/monitoring-dashboard.png is made (tests/e2e/test_monitoring.py, when MONITORING_PICTURE names
a PNG). One subplot per panel in the dashboard's order and titles, grouped under its rows; one line
per series named by the target's legendFormat; a stat panel shows each series' last value.

matplotlib comes from the `bench` extra and is imported only when a picture is drawn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = 3
UNITS = {"s": "seconds", "ops": "per second"}

# (expr, start, end, step) -> Prometheus's `data.result` of /api/v1/query_range
QueryRange = Callable[[str, float, float, float], list]


@dataclass
class Series:
    label: str
    times: list[float]  # seconds since the window's start
    values: list[float]


@dataclass
class Panel:
    title: str
    kind: str
    unit: str
    series: list[Series] = field(default_factory=list)


@dataclass
class Section:
    title: str
    panels: list[Panel] = field(default_factory=list)


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: `{{label}}` replaced by the series' label, or the labels when empty."""
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt).strip()


def fetch(
    dashboard: dict, query_range: QueryRange, promql: Callable[[str], str], start: float, end: float, step: float
):
    """The dashboard's panels with their series over [start, end], queries made concrete by `promql`."""
    sections = [Section("")]
    for spec in dashboard["panels"]:
        if spec["type"] == "row":
            sections.append(Section(spec["title"]))
            continue
        unit = spec.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        panel = Panel(spec["title"], spec["type"], unit)
        for target in spec.get("targets", []):
            for result in query_range(promql(target["expr"]), start, end, step):
                points = [(float(t) - start, float(v)) for t, v in result["values"]]
                panel.series.append(
                    Series(
                        legend(target.get("legendFormat", ""), result["metric"]),
                        [t for t, _ in points],
                        [v for _, v in points],
                    )
                )
        sections[-1].panels.append(panel)
    return [s for s in sections if s.panels]


def render(title: str, sections: list[Section], seconds: float, path: Path) -> None:
    """The panels as a grid, every time axis over the same window (`seconds` long), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The time axes start at the first sample any panel has (Prometheus's first scrapes)
    first = min((t for s in sections for p in s.panels for series in p.series for t in series.times[:1]), default=0)
    for series in (series for s in sections for p in s.panels for series in p.series):
        series.times = [t - first for t in series.times]
    seconds -= first
    heights = [math.ceil(len(s.panels) / COLUMNS) for s in sections]
    figure = plt.figure(figsize=(6 * COLUMNS, 4.2 * sum(heights) + 0.6), layout="constrained")
    figure.suptitle(title, fontsize=14, fontweight="bold")
    subfigures = figure.subfigures(len(sections), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, section, rows in zip(subfigures, sections, heights, strict=True):
        sub.suptitle(section.title, fontsize=13, x=0.01, ha="left")
        axes = sub.subplots(rows, COLUMNS, squeeze=False).flatten()
        for ax, panel in zip(axes, section.panels, strict=False):
            draw(ax, panel, seconds)
        for ax in axes[len(section.panels) :]:
            ax.set_visible(False)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def draw(ax, panel: Panel, seconds: float) -> None:
    ax.set_title(panel.title, fontsize=11)
    if panel.kind == "stat":
        ax.axis("off")
        lines = [f"{s.label}: {s.values[-1]:g}" for s in panel.series if s.values]
        ax.text(0.5, 0.5, "\n".join(lines) or "no data", ha="center", va="center", fontsize=12)
        return
    for series in panel.series:
        ax.plot(series.times, series.values, label=series.label, linewidth=1.4)
    ax.set_xlim(0, seconds)
    ax.set_xlabel("seconds since the first scrape", fontsize=8)
    ax.set_ylabel(UNITS.get(panel.unit, ""), fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if panel.series:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
