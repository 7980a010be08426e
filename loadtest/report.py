"""Results as JSON, CSV and PNG plots, and the table printed at the end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

CSV_DISTRIBUTIONS = ("latency_us", "ttft_us", "itl_us", "tpot_us")
CSV_STATS = ("avg", "p50", "p90", "p95", "p99", "max")
CSV_SCALARS = (
    "concurrency", "request_rate", "windows", "stable", "seconds", "requests", "successes",
    "errors", "throughput_rps", "tokens_per_s", "tokens_per_message", "sent_rps",
    "delayed_fraction", "sustained", "loadgen_cpu_cores", "loadgen_saturated",
    "server_cpu_cores", "server_cpu_s_per_request", "server_cpu_s_per_1k_tokens",
)  # fmt: skip


def write_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")


def write_csv(path: Path, levels: list[dict]) -> None:
    columns = list(CSV_SCALARS) + [f"{d}_{s}" for d in CSV_DISTRIBUTIONS for s in CSV_STATS]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for level in levels:
            row = []
            for column in CSV_SCALARS:
                value = level.get(column, "")
                if column == "errors":
                    value = ";".join(f"{k}={v}" for k, v in sorted(value.items()))
                row.append(value)
            for d in CSV_DISTRIBUTIONS:
                stats = level.get(d) or {}
                row += [stats.get(s, "") for s in CSV_STATS]
            writer.writerow(row)


def write_plots(directory: Path, results: dict) -> list[Path]:
    """latency.png (percentiles against throughput across the sweep) and, for streams,
    tokens.png (TTFT and inter-token latency by level). Nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    levels = [lv for lv in results["levels"] if lv.get("latency_us")]
    if not levels:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [lv["throughput_rps"] for lv in levels]
    for p in ("p50", "p90", "p99"):
        ax.plot(x, [lv["latency_us"][p] / 1000 for lv in levels], marker="o", label=p)
    for lv, xi in zip(levels, x, strict=True):
        ax.annotate(_level_name(lv), (xi, lv["latency_us"]["p99"] / 1000), fontsize=7)
    ax.set(xlabel="throughput (requests/s)", ylabel="latency (ms)",
           title=f"{results['rpc']} {results['model']}: latency against throughput")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(directory / "latency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    streams = [lv for lv in levels if lv.get("ttft_us")]
    if streams:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, title in ((axes[0], "ttft_us", "time to first token"),
                               (axes[1], "itl_us", "inter-token latency")):  # fmt: skip
            names = [_level_name(lv) for lv in streams if lv.get(key)]
            stats = [lv[key] for lv in streams if lv.get(key)]
            for i, s in enumerate(stats):  # p50 box, p90/p99 whiskers, as a distribution
                ax.plot([i, i], [s["p50"] / 1000, s["p99"] / 1000], color="tab:blue", lw=1)
                ax.plot([i - 0.2, i + 0.2], [s["p50"] / 1000] * 2, color="tab:blue", lw=3)
                ax.plot([i], [s["p90"] / 1000], "o", color="tab:orange", ms=4)
            ax.set_xticks(range(len(names)), names, fontsize=8)
            ax.set(title=f"{title} (p50 bar, p90 dot, p99 top)", ylabel="ms")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(directory / "tokens.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def _level_name(level: dict) -> str:
    if level.get("concurrency"):
        return f"c={level['concurrency']}"
    return f"{level['request_rate']:g}/s"


def table(levels: list[dict]) -> str:
    """The summary printed at the end, one line per level."""
    streams = any(lv.get("ttft_us") for lv in levels)
    head = ["level", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"]
    if streams:
        head += ["tok/s", "TTFT p50", "ITL p50"]
    head += ["loadgen cores", "server CPU ms/req"]
    rows = [head]
    for lv in levels:
        lat = lv.get("latency_us") or {}
        row = [
            _level_name(lv) + ("" if lv.get("stable", True) else " (unstable)"),
            f"{lv['throughput_rps']:.1f}",
            *(f"{lat[p] / 1000:.2f}" if lat else "-" for p in ("p50", "p95", "p99")),
            ", ".join(f"{k} {v}" for k, v in sorted(lv["errors"].items())) or "0",
        ]
        if streams:
            ttft, itl = lv.get("ttft_us") or {}, lv.get("itl_us") or {}
            row += [
                f"{lv['tokens_per_s']:.0f}",
                f"{ttft['p50'] / 1000:.2f}" if ttft else "-",
                f"{itl['p50'] / 1000:.3f}" if itl else "-",
            ]
        cpu = lv.get("server_cpu_s_per_request")
        row += [f"{lv['loadgen_cpu_cores']:.2f}", f"{cpu * 1000:.3f}" if cpu else "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
