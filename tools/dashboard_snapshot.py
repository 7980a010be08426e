"""The Grafana dashboard of the compose deployment, drawn without Grafana.

    .venv/bin/python tools/dashboard_snapshot.py --out docs/dashboard_sample.png [--duration 75]

Starts the load-testing deployment as local processes (deploy/topology.py, as
tests/test_deployment.py does: two `python -m serving` replicas on loopback ports,
Debian's nginx in front of them, Debian's Prometheus scraping both), loads it through
nginx with `python -m loadtest` (Classify on lenet5 and Generate streams on char_lstm,
each ramping its concurrency 1 -> 4 -> 16) and a client that sends a bad request every
half second (an unknown model, a corrupt PNG: the errors panel's series), then asks
that Prometheus (`/api/v1/query_range`) for every target of every panel of
deploy/grafana/dashboards/stepwise.json over the run and draws the panels where their
gridPos puts them on Grafana's 24-column grid: titles, legendFormat, units as the
panel's fieldConfig says. Grafana's variables are filled as Grafana fills them for a
data source whose scrape interval is the one used here: `$__interval` is the range over
the panel's width in pixels, at least the scrape interval; `$__rate_interval` is
max($__interval + scrape interval, 4 x scrape interval); the step is `$__interval`.
A target with no data fails the run, naming its panel. Every process is stopped at the
end, on error too. Needs Debian's nginx and prometheus on the PATH.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.topology import ROOT, Topology, local_topology  # noqa: E402
from serving._proto.stepwise.v1 import inference_pb2 as pb  # noqa: E402
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

DASHBOARD = ROOT / "deploy/grafana/dashboards/stepwise.json"
CONCURRENCY = (1, 4, 16)  # each load generator's ramp, one level per third of --duration
MAX_TOKENS = 128  # per Generate stream, as deploy/loadtest.sh
IDLE_S = 5.0  # scraped before and after the load, so the graphs start and end at rest
DASHBOARD_PX = 1920  # the browser width Grafana would lay the 24 columns out on


class NoData(Exception):
    """A panel target whose query returned nothing to draw."""


@dataclass
class Series:
    ref_id: str
    legend: str
    times: np.ndarray  # unix seconds, the query's step grid
    values: np.ndarray  # NaN where Prometheus returned no sample (a gap, as Grafana draws)


# -- the load ------------------------------------------------------------------------------


def bad_client(lb: str, stop: threading.Event, codes: Counter) -> None:
    """Every 0.5 s one bad Classify through nginx: an unknown model, then a corrupt PNG."""
    from loadtest.rpcs import digit_images

    requests = [
        pb.ClassifyRequest(model="no_such_model", image=digit_images(28)[3]),
        pb.ClassifyRequest(model="lenet5", image=b"\x89PNG\r\n\x1a\n not an image"),
    ]
    with grpc.insecure_channel(lb) as channel:
        stub = pb_grpc.InferenceStub(channel)
        k = 0
        while not stop.wait(0.5):
            try:
                stub.Classify(requests[k % 2], timeout=5)
                codes["OK"] += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1
            k += 1


def run_load(topology: Topology, duration: float) -> tuple[float, float, Counter]:
    """The load, ramped; returns its (start, end) in unix seconds and the bad client's
    status codes. Fails when a load generator fails."""
    level_s = duration / len(CONCURRENCY)
    levels = ",".join(map(str, CONCURRENCY))
    window = ("--concurrency", levels, "--duration", f"{level_s - 0.5:g}")  # + 0.5 s warm-up
    codes: Counter = Counter()
    stop = threading.Event()
    errors = threading.Thread(target=bad_client, args=(topology.lb, stop, codes), daemon=True)
    start = time.time()
    runs = {
        "classify": topology.loadtest("classify", "--rpc", "classify", *window),
        "generate": topology.loadtest("generate", "--rpc", "generate", "--model", "char_lstm",
                                      "--max-tokens", str(MAX_TOKENS), *window),
    }  # fmt: skip
    errors.start()
    try:
        for name, proc in runs.items():
            try:
                proc.wait(timeout=duration + 120)
            except subprocess.TimeoutExpired as err:
                raise SystemExit(
                    f"loadtest {name} still running after {duration + 120:g} s"
                ) from err
            if proc.returncode != 0:
                log = (topology.tmp / f"{name}.log").read_text()[-3000:]
                raise SystemExit(f"loadtest {name} failed ({proc.returncode}):\n{log}")
    finally:
        stop.set()
        errors.join(timeout=10)
    return start, time.time(), codes


# -- the dashboard's queries ---------------------------------------------------------------


def grafana_variables(dashboard: dict, panel: dict, range_s: float, scrape_s: float) -> dict:
    """What Grafana substitutes in this panel's queries over a range of `range_s` seconds
    from a data source scraped every `scrape_s` seconds (its timeInterval)."""
    width_px = panel["gridPos"]["w"] * DASHBOARD_PX / 24  # Grafana's maxDataPoints
    interval = max(scrape_s, math.ceil(range_s / width_px))
    variables = {
        "__interval": f"{interval:g}s",
        "__interval_ms": f"{interval * 1000:g}",
        "__rate_interval": f"{max(interval + scrape_s, 4 * scrape_s):g}s",
        "__range": f"{range_s:.0f}s",
        "__range_s": f"{range_s:.0f}",
        "__range_ms": f"{range_s * 1000:.0f}",
    }
    for var in dashboard.get("templating", {}).get("list", []):  # "All" selects every value
        value = var.get("current", {}).get("value", "$__all")
        values = value if isinstance(value, list) else [value]
        every = "$__all" in values or not values
        variables[var["name"]] = (var.get("allValue") or ".*") if every else "|".join(values)
    return variables


def fill(expr: str, variables: dict, where: str) -> str:
    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise SystemExit(f"{where}: no value for Grafana variable ${name} in {expr}")
        return variables[name]

    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", one, expr)


def legend(fmt: str, labels: dict) -> str:
    """Grafana's legendFormat: `{{label}}` replaced; no format: the series' labels."""
    if not fmt or fmt == "__auto":
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def query_panels(
    topology: Topology, dashboard: dict, start: float, end: float, scrape_s: float
) -> list[list[Series]]:
    """Every panel's series, in the dashboard's order. NoData names every target that
    returned nothing (or only NaN) over the range."""
    empty, drawn = [], []
    for panel in dashboard["panels"]:
        variables = grafana_variables(dashboard, panel, end - start, scrape_s)
        step = float(variables["__interval"][:-1])
        first, last = math.floor(start / step) * step, math.ceil(end / step) * step
        grid = np.arange(first, last + step / 2, step)
        series = []
        for target in panel["targets"]:
            where = f"panel {panel['title']!r} target {target['refId']}"
            expr = fill(target["expr"], variables, where)
            found = []
            for result in topology.query_range(expr, first, last, step):
                values = np.full(len(grid), np.nan)
                for t, v in result["values"]:
                    values[round((float(t) - first) / step)] = float(v)
                if not np.isnan(values).all():
                    name = legend(target.get("legendFormat", ""), result["metric"])
                    found.append(Series(target["refId"], name, grid, values))
            if not found:
                empty.append(f"{where}: no data for {expr}")
            series += sorted(found, key=lambda s: s.legend)
        drawn.append(series)
    if empty:
        raise NoData("\n".join(empty))
    return drawn


# -- the figure ----------------------------------------------------------------------------

# Grafana's dark theme and its classic palette
BACKGROUND, PANEL, BORDER, TEXT, GRID = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#2c3235"
PALETTE = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9",
           "#FADE2A", "#96D98D", "#FFB357", "#CA95E5", "#C0D8FF"]  # fmt: skip
COLUMN_IN, ROW_IN, GAP_IN = 20 / 24, 0.45, 0.1  # a grid row: Grafana's 30 px, stretched for legends
IDLE = "#5a5e66"  # series at 0 throughout
SECONDS = [(1e-6, "ns", 1e9), (1e-3, "µs", 1e6), (1.0, "ms", 1e3), (math.inf, "s", 1.0)]


def short(v: float) -> str:
    """Grafana's `short` unit: 1.5 K, 2 Mil."""
    for size, suffix in ((1e9, " Bil"), (1e6, " Mil"), (1e3, " K")):
        if abs(v) >= size:
            return f"{v / size:.3g}{suffix}"
    return f"{v:.3g}"


def formatter(unit: str):
    """A tick label function for one of Grafana's unit ids."""
    to_seconds = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}

    def label(v: float, _pos=None) -> str:
        if unit in to_seconds:
            seconds = v * to_seconds[unit]
            if seconds == 0:
                return "0 s"
            for below, name, scale in SECONDS:
                if abs(seconds) < below:
                    return f"{seconds * scale:.3g} {name}"
        if unit == "reqps":
            return f"{short(v)} req/s"
        return short(v) if unit in ("short", "none", "") else f"{short(v)} {unit}"

    return label


def overrides(panel: dict) -> dict[str, dict]:
    """refId -> {property: value} from the panel's byFrameRefID field overrides."""
    out: dict[str, dict] = {}
    for rule in panel.get("fieldConfig", {}).get("overrides", []):
        if rule["matcher"]["id"] == "byFrameRefID":
            props = out.setdefault(rule["matcher"]["options"], {})
            props.update({p["id"]: p["value"] for p in rule["properties"]})
    return out


def draw_panel(fig, panel: dict, series: list[Series], place):
    """One panel; `place(x, y, w, h)` turns inches from the panel's top left corner into
    a rectangle in figure fractions. Series at 0 throughout are drawn grey and share one
    legend entry, so the ones that moved stay readable."""
    import matplotlib.dates as mdates
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    width_in, height_in = (
        panel["gridPos"]["w"] * COLUMN_IN - GAP_IN,
        panel["gridPos"]["h"] * ROW_IN - GAP_IN,
    )
    box = place(0, 0, width_in, height_in)
    fig.add_artist(Rectangle(box[:2], *box[2:], transform=fig.transFigure, zorder=-1,
                             facecolor=PANEL, edgecolor=BORDER, linewidth=1))  # fmt: skip
    x, y = place(0.1, 0.1, 0, 0)[:2]
    fig.text(x, y, panel["title"], color=TEXT, fontsize=10.5, fontweight="bold", va="top",
             parse_math=False)  # fmt: skip

    default = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    per_ref = overrides(panel)
    side = {s.ref_id: per_ref.get(s.ref_id, {}).get("custom.axisPlacement", "left") for s in series}
    unit = {s.ref_id: per_ref.get(s.ref_id, {}).get("unit", default) for s in series}
    moved = [s for s in series if np.nanmax(np.abs(s.values)) > 0]
    idle = [s for s in series if s not in moved]
    names = [s.legend for s in moved] + ([f"+ {len(idle)} series at 0 throughout"] if idle else [])
    ncol = max(1, min(len(names), int((width_in - 0.3) // (0.063 * max(map(len, names)) + 0.5))))
    legend_in = math.ceil(len(names) / ncol) * 0.19 + 0.05
    right = "right" in side.values()
    plot = (0.85, 0.45, width_in - 0.85 - (0.85 if right else 0.25), height_in - legend_in - 0.8)
    ax = fig.add_axes(place(*plot))
    axes = {"left": ax, "right": ax.twinx()} if right else {"left": ax}
    handles = []
    for s in idle + moved:  # the moving lines on top
        times = [datetime.fromtimestamp(t, timezone.utc) for t in s.times]
        color = PALETTE[moved.index(s) % len(PALETTE)] if s in moved else IDLE
        (line,) = axes[side[s.ref_id]].plot(times, s.values, color=color, lw=1.2)
        if s in moved:
            handles.append(line)
    if idle:
        handles.append(Line2D([], [], color=IDLE, lw=1.2))
    for where, a in axes.items():
        units = [unit[ref] for ref, placed in side.items() if placed == where] or [default]
        a.yaxis.set_major_formatter(FuncFormatter(formatter(units[0])))
        a.yaxis.set_major_locator(MaxNLocator(5))
        a.set_ylim(bottom=0)
        a.set_facecolor(PANEL)
        a.tick_params(colors=TEXT, labelsize=8, length=0)
        for spine in a.spines.values():
            spine.set_visible(False)
    ax.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=5, maxticks=9, tz=timezone.utc))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=timezone.utc))
    grid = series[0].times  # every series of a panel is on its query's step grid
    ax.set_xlim(*(datetime.fromtimestamp(t, timezone.utc) for t in (grid[0], grid[-1])))
    ax.tick_params(axis="x", pad=5)
    anchor = place(0.15, height_in - legend_in - 0.05, 0, 0)[:2]
    fig.legend(handles, names, loc="upper left", bbox_to_anchor=anchor, ncol=ncol, fontsize=8,
               frameon=False, labelcolor=TEXT, handlelength=1.5, columnspacing=1.5)  # fmt: skip


def draw(dashboard: dict, panels: list[list[Series]], header: str, caption: str, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    top_in, foot_in = 0.6, 0.8
    width_in, height_in = 24 * COLUMN_IN, top_in + rows * ROW_IN + foot_in
    fig = plt.figure(figsize=(width_in, height_in), facecolor=BACKGROUND)
    fig.text(0.1 / width_in, 1 - 0.3 / height_in, header, color=TEXT, fontsize=13, va="center",
             parse_math=False)  # fmt: skip
    for panel, series in zip(dashboard["panels"], panels, strict=True):
        g = panel["gridPos"]
        x0, y0 = g["x"] * COLUMN_IN + GAP_IN / 2, top_in + g["y"] * ROW_IN + GAP_IN / 2

        def place(x, y, w, h, x0=x0, y0=y0):
            return (x0 + x) / width_in, 1 - (y0 + y + h) / height_in, w / width_in, h / height_in

        draw_panel(fig, panel, series, place)
    fig.text(0.1 / width_in, (foot_in - 0.12) / height_in, caption, color=TEXT, fontsize=9,
             va="top", linespacing=1.5, parse_math=False)  # fmt: skip
    png = io.BytesIO()
    fig.savefig(png, dpi=90, facecolor=BACKGROUND)
    plt.close(fig)
    # A dashboard is a few flat colours: a 128-colour palette keeps it a third of the size.
    Image.open(png).convert("RGB").quantize(128).save(out, optimize=True)


# -- the run -------------------------------------------------------------------------------


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.machine(),
    )  # fmt: skip
    return f"{os.cpu_count()} CPU cores ({model}), {platform.system()}"


def nginx_version() -> str:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10)
    return out.stderr.strip().rsplit("/", 1)[-1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs/dashboard_sample.png")
    p.add_argument("--duration", type=float, default=75.0, help="seconds of load (the ramp)")
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--dashboard", type=Path, default=DASHBOARD)
    p.add_argument("--scrape-interval", type=float, default=2.0, help="Prometheus's, seconds")
    return p.parse_args(argv)


def failed_scrapes(topology: Topology, since: float) -> int:
    """Scrapes since `since` that got no answer within the scrape interval (a replica
    too busy to serve /metrics in time): each leaves a gap in that replica's series."""
    window = f"{math.ceil(time.time() - since)}s"
    found = topology.query(f"sum(count_over_time(up[{window}]) - sum_over_time(up[{window}]))")
    return round(float(found[0]["value"][1])) if found else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the topology on SIGTERM too
    dashboard = json.loads(args.dashboard.read_text())
    scrape = args.scrape_interval
    with tempfile.TemporaryDirectory(prefix="dashboard-snapshot-") as tmp:
        with local_topology(args.model_repository, Path(tmp), 2, f"{scrape:g}s") as topology:
            version = topology.prometheus_version()
            time.sleep(IDLE_S)
            start, end, codes = run_load(topology, args.duration)
            time.sleep(IDLE_S + 2 * scrape)  # the last window scraped, then rest
            first, last = start - IDLE_S, end + IDLE_S
            try:
                panels = query_panels(topology, dashboard, first, last, scrape)
            except NoData as err:
                print(f"dashboard_snapshot: panels without data:\n{err}", file=sys.stderr)
                return 1
            missed = failed_scrapes(topology, first)
    rate = grafana_variables(dashboard, dashboard["panels"][0], last - first, scrape)
    when = datetime.fromtimestamp(first, timezone.utc)
    header = (f"stepwise  ·  {when:%Y-%m-%d %H:%M:%S} to "
              f"{datetime.fromtimestamp(last, timezone.utc):%H:%M:%S} UTC")  # fmt: skip
    ramp = " -> ".join(map(str, CONCURRENCY))
    bad = ", ".join(f"{code} x{n}" for code, n in sorted(codes.items()))
    gaps = f"; {missed} scrape(s) timed out, leaving gaps" if missed else ""
    caption = (
        f"Panels of {os.path.relpath(args.dashboard.resolve(), ROOT)}, each drawn from its own "
        f"PromQL against Prometheus {version} scraping 2 local replicas (every {scrape:g} s; "
        f"$__rate_interval = {rate['__rate_interval']}{gaps}) through nginx {nginx_version()}; "
        "drawn by tools/dashboard_snapshot.py, not Grafana's UI.\n"
        f"Load through nginx: python -m loadtest, Classify lenet5 at concurrency {ramp} and "
        f"Generate char_lstm ({MAX_TOKENS} tokens) at {ramp} streams, "
        f"{args.duration / len(CONCURRENCY):g} s per level, plus one bad Classify every 0.5 s "
        f"({bad}).\nCANCELLED: calls in flight when a level ends and its connections close. "
        f"{when:%Y-%m-%d}, {machine()}: replicas, nginx, Prometheus and the load generators "
        "share the cores."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(dashboard, panels, header, caption, args.out)
    for panel, series in zip(dashboard["panels"], panels, strict=True):
        print(f"{panel['title']}: {len(series)} series")
    print(f"{missed} failed scrape(s); bad client: {bad}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB) in "
          f"{time.monotonic() - began:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
