"""
The scaling benchmark's results file and chart: throughput per process count
for echotw and uvloop, the ratio between them, scaling efficiency and how
evenly the work spread over the workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from report import Cells, flags, medianCells, table
from workloads import Workload, value

UNITS = {"pingpong": "round trips/s", "stream": "MB/s", "churn": "connections/s"}
COST_UNITS = {"pingpong": "per round trip", "stream": "per MB", "churn": "per connection"}
UNEVEN = 0.5  # a worker below half the average CPU share


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def efficiency(cells: Cells, kind: str, workers: int, wl: Workload) -> float | None:
    """Throughput at N / (N x throughput at 1)."""
    one, n = (
        value(cells.get((f"{kind}/1", wl.name))),
        value(cells.get((f"{kind}/{workers}", wl.name))),
    )
    return n / (workers * one) if one and n else None


def ratioToUvloop(cells: Cells, workers: int, wl: Workload) -> float | None:
    mine = value(cells.get((f"echotw/{workers}", wl.name)))
    theirs = value(cells.get((f"uvloop/{workers}", wl.name)))
    return mine / theirs if mine and theirs else None


def cellFlags(r: dict[str, Any], args: Any) -> list[str]:
    """Why a row should not be read as it stands, or what it cannot show."""
    out = flags(r, args.noise_limit)
    plan = args.plan
    if r["workers"] > len(plan.serverCpus):
        out.append(f"{r['workers']} processes share {len(plan.serverCpus)} CPU(s): cannot scale")
    if r.get("spread") is not None and r["spread"] < UNEVEN and r["workers"] > 1:
        out.append("uneven: a worker below half the average CPU")
    if r.get("workers_replaced"):
        out.append(f"{r['workers_replaced']} worker(s) replaced during the cell")
    strayServer = set(r.get("server_cpus_seen") or []) - set(plan.serverCpus)
    strayClient = set(r.get("client_cpus_seen") or []) - set(plan.clientCpus)
    if strayServer or strayClient:
        out.append(
            f"ran outside its CPUs (server seen on {sorted(strayServer) or '-'}, "
            f"clients on {sorted(strayClient) or '-'})"
        )
    return out


def _workers(r: dict[str, Any]) -> str:
    shares = r.get("worker_cpu_pct") or []
    conns = r.get("worker_conns")
    parts = []
    for i, share in enumerate(shares):
        text = "gone" if share is None else f"{share:.0f}"
        if conns is not None and i < len(conns):
            text += f" ({conns[i]})"
        parts.append(text)
    return " / ".join(parts) or "-"


def _row(cells: Cells, kind: str, workers: int, wl: Workload, args: Any) -> list[str] | None:
    r = cells.get((f"{kind}/{workers}", wl.name))
    if r is None:
        return None
    v = value(r)
    if v is None:
        return [str(workers), f"FAIL: {r.get('fatal', '?')}", *["-"] * 9]
    eff = efficiency(cells, kind, workers, wl)
    ratio = ratioToUvloop(cells, workers, wl) if kind == "echotw" else None
    sup = r.get("supervisor_cpu_pct")
    cost = r["server_cpu_pct"] / 100 / v * 1e6 if v else None
    user = r.get("server_user_pct")
    userCost = user / 100 / v * 1e6 if v and user is not None else None
    return [
        str(workers),
        _fmt(v),
        "-" if ratio is None else f"{ratio:.2f}",
        "-" if eff is None else f"{eff:.2f}",
        f"{r['server_cpu_pct']:.0f}" + ("" if sup is None else f" ({sup:.0f})"),
        _workers(r),
        "-" if r.get("spread") is None else f"{r['spread']:.2f}",
        "-" if cost is None else f"{cost:,.1f}",
        "-" if userCost is None else f"{userCost:,.1f}",
        f"{r.get('client_idle_pct', 0):.0f}",
        "; ".join(f"**{f}**" for f in cellFlags(r, args)),
    ]


def workloadSection(cells: Cells, wl: Workload, args: Any) -> list[str]:
    columns = [
        "processes",
        UNITS[wl.mode],
        "x uvloop",
        "efficiency",
        "server CPU % (supervisor)",
        "CPU % per worker (connections)",
        "spread",
        f"server CPU µs {COST_UNITS[wl.mode]}",
        "of which user space",
        "client idle %",
        "flags",
    ]
    rows = []
    for kind in args.kinds:
        for workers in args.plan.workers:
            row = _row(cells, kind, workers, wl, args)
            if row is not None:
                rows.append((kind, row))
    return [f"### {wl.title}", "", *table(columns, rows), ""]


def summary(cells: Cells, args: Any) -> list[str]:
    """One line per workload, one column per server and process count (as measured)."""
    labels = [(k, n) for k in args.kinds for n in args.plan.workers]
    lines = [
        "| workload | " + " | ".join(f"{k} {n}" for k, n in labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for wl in args.wls:
        vals = [_fmt(value(cells.get((f"{k}/{n}", wl.name)))) for k, n in labels]
        lines.append(f"| {wl.title} | " + " | ".join(vals) + " |")
    return lines


def machineLines(info: dict[str, str], args: Any) -> list[str]:
    plan = args.plan
    return [
        f"- Date: {info['date']}",
        f"- CPU: {info['cpu']}, {info['nproc']} CPUs; kernel {info['kernel']}",
        f"- Python {info['python']}, Twisted {info['twisted']}, uvloop {info['uvloop']}",
        *([f"- Calibration: {info['calibration']}"] if "calibration" in info else []),
        f"- Servers pinned to CPUs {_cpuList(plan.serverCpus)} ({len(plan.serverCpus)}); "
        f"{len(plan.clientCpus)} loadgen process(es), one pinned to each of CPUs "
        f"{_cpuList(plan.clientCpus)} ({'blocking' if args.block_client else 'busy-polling'} "
        "epoll)",
        f"- {args.warmup:g} s warm-up + {args.seconds:g} s measured per cell, "
        f"{args.rounds} round(s), median kept; every echoed byte verified",
        f"- echotw: `{args.echotw}`; uvloop: `{args.uvloop}` (SO_REUSEPORT, one socket "
        "per process)",
        "- ping-pong and stream connections are split over the load clients; churn's "
        "count is cycles in flight per client",
    ]


def _cpuList(cpus: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cpus)


LEGEND = [
    "How to read it: **x uvloop** is echotw's throughput over uvloop's at the same process "
    "count; **efficiency** is throughput at N ÷ (N x throughput at 1) for the same server. "
    "**server CPU %** adds up every process of the server (100 = one CPU), over the whole "
    "load-client run; the supervisor's own share is in parentheses. **CPU % per worker** "
    "lists each worker in start order, with the connections it held at the peak of the "
    "run (ping-pong and stream; churn's connections are too brief to count): a worker at "
    "0 got no work. **spread** is the lowest worker's CPU share over the average (1 is "
    "even). **server CPU µs** is the server's CPU time over the run divided by the "
    "measured rate, and **of which user space** its part outside the kernel (what the "
    "server's own code costs; the rest is system calls and the TCP stack). **client idle %** "
    "near 0 means the clients, not the server, set the pace.",
]


def markdown(
    results: list[dict[str, Any]],
    args: Any,
    info: dict[str, str],
    chartName: str | None,
    chartErr: str | None,
) -> str:
    cells = medianCells(results)
    parts = ["# echotw scaling benchmark", "", *machineLines(info, args), ""]
    parts += ["## Summary", "", *summary(cells, args), ""]
    parts += ["## Per workload", ""]
    for wl in args.wls:
        parts += workloadSection(cells, wl, args)
    parts += [*LEGEND, ""]
    parts += [f"![scaling]({chartName})" if chartName else f"(no chart: {chartErr})", ""]
    return "\n".join(parts).rstrip() + "\n"


def chart(results: list[dict[str, Any]], args: Any, info: dict[str, str], out: Path) -> str | None:
    """Throughput per process count (top) and each worker's CPU share (bottom); None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib missing: {e}"
    cells = medianCells(results)
    wls, counts = args.wls, list(args.plan.workers)
    fig, axes = plt.subplots(2, len(wls), figsize=(4.4 * len(wls), 7.2), dpi=110, squeeze=False)
    styles = {"echotw": ("tab:blue", "o", 0.94), "uvloop": ("tab:orange", "s", 1.06)}
    for col, wl in enumerate(wls):
        top, bottom = axes[0][col], axes[1][col]
        for kind in args.kinds:
            color, marker, nudge = styles[kind]
            points = [(n, value(cells.get((f"{kind}/{n}", wl.name)))) for n in counts]
            xs = [n for n, v in points if v is not None]
            top.plot(
                xs, [v for _, v in points if v is not None], marker=marker, color=color, label=kind
            )
            for n in counts:
                r = cells.get((f"{kind}/{n}", wl.name)) or {}
                shares = [s for s in r.get("worker_cpu_pct") or [] if s is not None]
                bottom.scatter(
                    [n * nudge] * len(shares),
                    shares,
                    color=color,
                    marker=marker,
                    s=18,
                    alpha=0.8,
                    label=kind if n == counts[0] else None,
                )
        one = value(cells.get(("echotw/1", wl.name)))
        if one:
            cpus = len(args.plan.serverCpus)  # past that, more processes only share CPUs
            top.plot(
                counts,
                [min(n, cpus) * one for n in counts],
                linestyle="--",
                color="grey",
                linewidth=0.8,
                label=f"echotw 1 x N (N up to {cpus} CPUs)",
            )
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(counts, [str(n) for n in counts])
            ax.set_xlabel("processes")
        top.set_title(wl.title, fontsize=9)
        top.set_ylabel(UNITS[wl.mode])
        top.set_ylim(bottom=0)
        bottom.set_ylabel("CPU % of each worker")
        bottom.set_ylim(bottom=-3)
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    plan = args.plan
    fig.suptitle(
        f"echotw --workers N vs N uvloop SO_REUSEPORT processes, {info['date']}\n"
        f"{info['cpu']}: servers on {len(plan.serverCpus)} CPU(s), "
        f"{len(plan.clientCpus)} load client(s) on the others",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return None
