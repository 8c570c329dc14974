"""The bench figure: gen_rate against budget (log x) per method, and tokens/s against budget beside it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(rows: list[dict], path: str, title: str = "") -> None:
    fig, (ax_rate, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[tuple, list[dict]] = {}
    flat: list[dict] = []
    for r in rows:
        if isinstance(r["budget"], int) and r["budget"] > 0:
            series.setdefault((r["set"], r["method"], r["temp"]), []).append(r)
        elif r["budget"] == 0:
            flat.append(r)
    for i, ((set_name, method, temp), points) in enumerate(sorted(series.items())):
        points.sort(key=lambda r: r["budget"])
        label = f"{method} t={temp:g} ({set_name})"
        style = dict(marker="o", linestyle="-" if method == "specexec" else "--", label=label)
        ax_rate.plot([p["budget"] for p in points], [p["gen_rate"] for p in points], **style)
        ax_speed.plot([p["budget"] for p in points], [p["tok/s"] for p in points], **style)
    for k, r in enumerate(flat, start=len(series)):
        label = f"{r['method']} t={r['temp']:g} ({r['set']})"
        style = dict(linestyle=":", linewidth=1.5, color=f"C{k % 10}", label=label)
        ax_speed.axhline(r["tok/s"], **style)
        if r["method"] == "hf-assisted":
            ax_rate.axhline(r["gen_rate"], **style)
    for ax, ylabel in ((ax_rate, "generated tokens per target forward"), (ax_speed, "tokens / s (end to end)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (draft tree nodes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_speed.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(curve: dict[int, float], title: str, path: str) -> None:
    """`specexec profile --plot`: milliseconds per forward against tokens in it (log x)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(curve), [v * 1e3 for v in curve.values()], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the forward (1 appended + tree)")
    ax.set_ylabel("ms per forward")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
