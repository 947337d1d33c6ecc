"""The PNG: latency percentiles, overhead-bound throughput, efficiency; gpuq beside Celery, targets drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.workloads import TARGETS

COLORS = {"gpuq": "#1f77b4", "celery": "#9e9e9e"}
LABELS = {"gpuq": "gpuq", "celery": "Celery (baseline)"}


def plot(figures: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    systems: list[str] = [s for s in ("gpuq", "celery") if s in figures]
    service = f"{figures[systems[0]]['efficiency']['service'] * 1000:g} ms jobs"
    fig, (lat, tput, eff) = plt.subplots(1, 3, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 1.2, 1.2]})
    fig.suptitle(title, fontsize=11)

    # 1. latency percentiles of the efficiency run (log scale: gpuq and Celery differ by orders of magnitude)
    groups = [("dispatch_latency_ms", "dispatch latency"), ("turnaround_ms", "slot turnaround")]
    quantiles = ["p50", "p90", "p99"]
    width = 0.8 / len(systems)
    ticks, names = [], []
    for g, (key, _) in enumerate(groups):
        for q, quantile in enumerate(quantiles):
            x = g * (len(quantiles) + 1) + q
            ticks.append(x)
            names.append(quantile)
            for s, system in enumerate(systems):
                value = figures[system]["efficiency"][key][quantile]
                bx = x + (s - (len(systems) - 1) / 2) * width
                lat.bar(bx, value, width, color=COLORS[system], label=LABELS[system] if x == 0 else None)
                lat.annotate(_short(value), (bx, value), ha="center", va="bottom", fontsize=7)
    targets = {
        ("dispatch_latency_ms", "p50"): TARGETS["dispatch_p50_ms"],
        ("dispatch_latency_ms", "p99"): TARGETS["dispatch_p99_ms"],
        ("turnaround_ms", "p50"): TARGETS["turnaround_p50_ms"],
        ("turnaround_ms", "p99"): TARGETS["turnaround_p99_ms"],
    }
    for g, (key, _) in enumerate(groups):
        for q, quantile in enumerate(quantiles):
            target = targets.get((key, quantile))
            if target is not None:
                x = g * (len(quantiles) + 1) + q
                label = "target" if (g, q) == (0, 0) else None
                lat.hlines(target, x - 0.45, x + 0.45, colors="red", linestyles="dashed", label=label)
    lat.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    lat.yaxis.set_major_formatter(plain)
    lat.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))
    lat.yaxis.set_minor_formatter(plain)
    lat.tick_params(axis="y", which="minor", labelsize=7)
    lat.set_xticks(ticks, names, fontsize=8)
    for g, (_, name) in enumerate(groups):
        center = g * (len(quantiles) + 1) + (len(quantiles) - 1) / 2
        lat.text(center, -0.09, name, transform=lat.get_xaxis_transform(), ha="center", va="top", fontsize=9)
    lat.set_ylabel("ms (log scale)")
    lat.set_title(f"latency, {service} (lower is better)", fontsize=10)
    lat.legend(fontsize=8, loc="upper center", ncols=3, bbox_to_anchor=(0.5, -0.13), frameon=False)

    # 2. overhead-bound throughput
    _bars(tput, systems, [figures[s]["overhead"]["jobs_per_s"] for s in systems], "{:,.0f}")
    tput.axhline(TARGETS["overhead_jobs_per_s"], color="red", linestyle="dashed")
    tput.set_ylabel("jobs/s")
    ratio = ""
    if len(systems) == 2 and figures["celery"]["overhead"]["jobs_per_s"]:
        times = figures["gpuq"]["overhead"]["jobs_per_s"] / figures["celery"]["overhead"]["jobs_per_s"]
        ratio = f", gpuq = {times:.2f} x Celery"
    tput.set_title(f"throughput, 0 ms jobs\n(higher is better{ratio})", fontsize=10)

    # 3. efficiency
    _bars(eff, systems, [figures[s]["efficiency"]["efficiency"] for s in systems], "{:.2f}")
    eff.axhline(TARGETS["efficiency"], color="red", linestyle="dashed")
    eff.set_ylim(0, 1.05)
    eff.set_title(f"efficiency, {service}\nideal / measured makespan", fontsize=10)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, systems: list[str], values: list[float], fmt: str) -> None:
    xs = range(len(systems))
    ax.bar(xs, values, 0.6, color=[COLORS[s] for s in systems])
    ax.set_xticks(list(xs), [LABELS[s] for s in systems], fontsize=8)
    for x, value in zip(xs, values, strict=True):
        ax.annotate(fmt.format(value), (x, value), ha="center", va="bottom", fontsize=8)


def _short(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"
