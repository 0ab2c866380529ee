"""
Turning the raw JSON lines into the results file and the chart.

Every cell keeps the median round (the lower middle for an even count, so the
figure is one that was really measured); a byte mismatch in any round shows
in the cell whatever the median says.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from servers import CLIENT_CPU, SERVER_CPU, SPECS
from workloads import Workload, value

BASELINES = ("uvloop_proto", "twisted_naive")
Cells = dict[tuple[str, str], dict[str, Any]]


def machine(python: str) -> dict[str, str]:
    """What the numbers were measured on: they mean little without it."""
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    twisted = _run([python, "-c", "import twisted; print(twisted.__version__)"])
    uvloop = _run([python, "-c", "import uvloop; print(uvloop.__version__)"])
    pyver = _run([python, "-c", "import platform; print(platform.python_version())"])
    return {
        **calibration(python),
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "cpu": model,
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": pyver,
        "twisted": twisted,
        "uvloop": uvloop,
        "gcc": _run(["gcc", "-dumpfullversion"]),
    }


_CALIBRATE = """
import os, sysconfig, time
def f(): pass
def best(fn, n):
    runs = []
    for _ in range(5):
        t = time.perf_counter_ns(); fn(n); runs.append((time.perf_counter_ns() - t) / n)
    return min(runs)
def calls(n):
    for _ in range(n): f()
def clock(n):
    now = time.time
    for _ in range(n): now()
def syscall(n):
    ppid = os.getppid
    for _ in range(n): ppid()
args = sysconfig.get_config_var("CONFIG_ARGS") or ""
build = [w for w in ("--enable-optimizations", "--with-lto") if w in args]
if sysconfig.get_config_var("Py_ENABLE_SHARED"):
    build.append("--enable-shared")
print(f"{best(calls, 200000):.0f} {best(clock, 200000):.0f} {best(syscall, 50000):.0f}",
      " ".join(build) or "none")
"""


def calibration(python: str) -> dict[str, str]:
    """
    What one Python call, one clock reading and one system call cost on this
    machine, in ns, and how the interpreter was built: the same server can
    cost twice as much per connection on another machine, and these tell
    whether its interpreter or its kernel is the slower part there.
    """
    try:
        call, clock, syscall, build = _run([python, "-c", _CALIBRATE]).split(" ", 3)
    except ValueError:
        return {}
    try:
        source = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        clocksource = source.read_text().strip()
    except OSError:
        clocksource = "?"
    return {
        "calibration": f"a Python call {call} ns, time.time() {clock} ns ({clocksource} "
        f"clock), a system call (getppid) {syscall} ns; Python built with {build}",
    }


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def medianCells(results: Iterable[dict[str, Any]]) -> Cells:
    """(server, workload) -> the median round, flagged if any round mismatched."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["server"], r["workload"]), []).append(r)
    cells = {}
    for key, rounds in groups.items():
        good = [r for r in rounds if value(r) is not None]
        if good:
            good.sort(key=lambda r: value(r) or 0.0)
            pick = dict(good[(len(good) - 1) // 2])
        else:
            pick = dict(rounds[-1])
        pick["rounds"] = len(rounds)
        pick["any_mismatch"] = any(r.get("mismatches") for r in rounds)
        cells[key] = pick
    return cells


def _lat(us: int | None) -> str:
    if us is None:
        return "?"
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us} µs"


def flags(r: dict[str, Any], noiseLimit: float) -> list[str]:
    """Why a cell should not be trusted as it stands."""
    out = []
    if r.get("any_mismatch"):
        out.append("BYTE MISMATCH")
    if r.get("errors"):
        out.append(f"{r['errors']:,} conn errors")
    if r.get("capped"):
        out.append(f"forking: capped at {r.get('conns', 0):,}")
    if r.get("other_cpu_pct", 0) > noiseLimit:
        top = ", ".join(r.get("other_top") or [])
        out.append(f"noisy: others {r['other_cpu_pct']:.0f}% CPU ({top})")
    perS = [v for v in r.get("per_s") or [] if v is not None]
    if len(perS) > 1 and min(perS) > 0 and max(perS) > 1.25 * min(perS):
        out.append(f"unsteady {min(perS):,.0f}-{max(perS):,.0f}/s")
    secs = r.get("seconds") or 0
    if secs and r.get("mode") != "hold" and (r.get("last_progress_s") or 0) < 0.9 * secs:
        out.append(f"stalled after {r.get('last_progress_s', 0):.1f} s")
    return out


def cellText(r: dict[str, Any] | None, noiseLimit: float) -> str:
    if r is None:
        return "-"
    v = value(r)
    if v is None:
        return f"FAIL: {r.get('fatal', '?')}"
    mode = r.get("mode")
    if mode == "stream":
        text = f"{v:,.0f}"
    elif mode == "churn":
        text = f"{v:,.0f} ({_lat(r.get('p50_us'))}/{_lat(r.get('p99_us'))})"
    elif mode == "hold":
        text = f"{v:,.2f} ({r.get('pss_kib_per_conn', 0):,.2f})"
    else:
        text = f"{v:,.0f} ({_lat(r.get('p99_us'))})"
    return text + "".join(f" **[{f}]**" for f in flags(r, noiseLimit))


def ratio(cells: Cells, server: str, base: str, wl: Workload) -> float | None:
    """server / base; for idle10k base / server, so that above 1 is better everywhere."""
    v, b = value(cells.get((server, wl.name))), value(cells.get((base, wl.name)))
    if not v or not b:
        return None
    return b / v if wl.mode == "hold" else v / b


def table(columns: Iterable[str], rows: Iterable[tuple[str, Iterable[str]]]) -> list[str]:
    """A markdown table with a server column first: its header and one line per row."""
    names = list(columns)
    return [
        "| server | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        *(f"| {server} | " + " | ".join(row) + " |" for server, row in rows),
    ]


def rateWorkloads(wls: list[Workload]) -> list[Workload]:
    """The workloads measured as a rate (all but idle10k)."""
    return [w for w in wls if w.mode != "hold"]


def mainTable(cells: Cells, servers: list[str], wls: list[Workload], noise: float) -> list[str]:
    return table(
        (w.title for w in wls),
        ((s, [cellText(cells.get((s, w.name)), noise) for w in wls]) for s in servers),
    )


def ratioTable(cells: Cells, servers: list[str], wls: list[Workload]) -> list[str]:
    bases = [b for b in BASELINES if b in servers]
    if not bases:
        return []

    def ratios(s: str, w: Workload) -> str:
        rs = [ratio(cells, s, b, w) for b in bases]
        return " / ".join("-" if x is None else f"{x:.2f}" for x in rs)

    return [
        f"Ratios: server / {' and server / '.join(bases)} (idle10k: baseline / server, "
        "so above 1 is better in every column)",
        "",
        *table((w.name for w in wls), ((s, [ratios(s, w) for w in wls]) for s in servers)),
    ]


def cpuTable(cells: Cells, servers: list[str], wls: list[Workload]) -> list[str]:
    rate = rateWorkloads(wls)
    if not rate:
        return []

    def busy(s: str, w: Workload) -> str:
        r = cells.get((s, w.name))
        if not r or "cpu_server_busy_pct" not in r:
            return "-"
        return (
            f"{r['cpu_server_busy_pct']:.0f} / {r['cpu_client_busy_pct']:.0f} / "
            f"{r.get('client_idle_pct', 0):.0f} / {r.get('other_cpu_pct', 0):.0f}"
        )

    return [
        f"CPU during each cell (whole loadgen run), %: CPU {SERVER_CPU} busy (the pinned "
        f"server) / CPU {CLIENT_CPU} busy (the client) / client idle share (empty polls, "
        "measured window) / other processes on the machine, % of one CPU. Client idle near "
        "0: the client set the pace, not the server.",
        "",
        *table((w.name for w in rate), ((s, [busy(s, w) for w in rate]) for s in servers)),
    ]


def serverCostTable(cells: Cells, servers: list[str], wls: list[Workload]) -> list[str]:
    """
    Server CPU per unit of work: where the client sets the pace (churn, and
    ping-pong against the fastest servers) rates tie, and this still differs.
    """
    rate = rateWorkloads(wls)
    if not rate:
        return []
    units = {"stream": "per MB"}
    forking = {spec.name for spec in SPECS if spec.forking}

    def cost(s: str, w: Workload) -> str:
        r = cells.get((s, w.name))
        v = value(r)
        if not r or not v or "server_group_cpu_pct" not in r:
            return "-"
        return f"{r['server_group_cpu_pct'] / 100 / v * 1e6:.1f}"

    return [
        "Server CPU per unit of work, µs (the server's processes' CPU time over the loadgen "
        "run ÷ the measured rate; per round trip, per MB streamed, per connection; lower is "
        "better). It tells servers apart where the client, not the server, set the pace. "
        "Forking servers are left out: their children's time is not all visible.",
        "",
        *table(
            (f"{w.name} ({units.get(w.mode, 'per op')})" for w in rate),
            ((s, [cost(s, w) for w in rate]) for s in servers if s not in forking),
        ),
    ]


def idleTable(cells: Cells, servers: list[str]) -> list[str]:
    rows = [(s, cells[(s, "idle10k")]) for s in servers if (s, "idle10k") in cells]
    if not rows:
        return []
    lines = [
        "idle10k: server memory (summed over its process group) read "
        "1 s after the last of the connections' one verified 16-byte echo, minus the same "
        "read before them, on a freshly started server. User-space only: the kernel's socket "
        "memory is in no process's RSS.",
        "",
        "| server | conns held | RSS before → after MiB | KiB/conn RSS | KiB/conn PSS | processes |",
        "|---|---|---|---|---|---|",
    ]
    for s, r in rows:
        b, a = r.get("mem_before") or {}, r.get("mem_after") or {}
        if value(r) is None or not a:
            lines.append(f"| {s} | FAIL: {r.get('fatal', '?')} | - | - | - | - |")
            continue
        lines.append(
            f"| {s} | {r.get('conns_ready', 0):,} of {r.get('asked', 0):,} | "
            f"{b['rss_kib'] / 1024:,.1f} → {a['rss_kib'] / 1024:,.1f} | "
            f"{r['kib_per_conn']:,.2f} | {r['pss_kib_per_conn']:,.2f} | "
            f"{b['procs']} → {a['procs']} |"
        )
    return lines


def rulesSection(micro: dict[str, Any] | None) -> list[str]:
    if not micro:
        return []
    if "error" in micro:
        return ["## Access-rule lookups", "", f"FAIL: {micro['error']}"]
    return [
        "## Access-rule lookups (micro-benchmark)",
        "",
        f"`echotw.rules.policy.AccessRules` built from {micro['networks']:,} random networks "
        "(80 % IPv4 /16-/32, 20 % IPv6 /32-/128, fixed seed) in "
        f"{micro['build_s']:.2f} s; {micro['queries']:,} Twisted `IPv4Address`/`IPv6Address` "
        f"checks per pass (half inside a listed network), median of {micro['repeats']} passes:",
        "",
        "| rules | µs per check |",
        "|---|---|",
        f"| allow, 1 network | {micro['allow_1_us']:.2f} |",
        f"| allow, {micro['networks']:,} networks | {micro['allow_100k_us']:.2f} |",
        f"| deny, {micro['networks']:,} networks | {micro['deny_100k_us']:.2f} |",
    ]


def machineLines(info: dict[str, str], args: Any) -> list[str]:
    return [
        f"- Date: {info['date']}",
        f"- CPU: {info['cpu']}, {info['nproc']} CPUs; kernel {info['kernel']}",
        f"- Python {info['python']}, Twisted {info['twisted']}, uvloop {info['uvloop']}, "
        f"gcc {info['gcc']}",
        *([f"- Calibration: {info['calibration']}"] if "calibration" in info else []),
        f"- Server pinned to CPU {SERVER_CPU}, loadgen to CPU {CLIENT_CPU} "
        f"({'blocking' if args.block_client else 'busy-polling'} epoll)",
        f"- {args.warmup:g} s warm-up + {args.seconds:g} s measured per cell, "
        f"{args.rounds} round(s), median kept; every echoed byte verified",
        f"- echotw command: `{args.echotw}`",
    ]


def markdown(
    results: list[dict[str, Any]],
    servers: list[str],
    wls: list[Workload],
    info: dict[str, str],
    args: Any,
    extra: list[str],
) -> str:
    cells = medianCells(results)
    parts = ["# echotw benchmark", "", *machineLines(info, args), ""]
    parts += [*mainTable(cells, servers, wls, args.noise_limit), ""]
    sections = (
        ratioTable(cells, servers, wls),
        cpuTable(cells, servers, wls),
        serverCostTable(cells, servers, wls),
    )
    for section in sections:
        if section:
            parts += [*section, ""]
    if any(w.mode == "hold" for w in wls):
        parts += [*idleTable(cells, servers), ""]
    parts += extra
    return "\n".join(parts).rstrip() + "\n"


def chart(
    results: list[dict[str, Any]], servers: list[str], wls: list[Workload], out: Path, title: str
) -> str | None:
    """Bars of each server's ratio to uvloop_proto per workload; None or why not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib missing: {e}"
    cells = medianCells(results)
    if "uvloop_proto" not in servers:
        return "no uvloop_proto cells to compare with"
    width = 0.8 / max(len(wls), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(servers) + 2), 4.8), dpi=110)
    for i, w in enumerate(wls):
        ys = [ratio(cells, s, "uvloop_proto", w) or 0.0 for s in servers]
        xs = [j + (i - (len(wls) - 1) / 2) * width for j in range(len(servers))]
        ax.bar(xs, ys, width, label=w.name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.8, color="grey", linewidth=0.8, linestyle="--", label="0.8x")
    ax.set_xticks(range(len(servers)), servers, rotation=20, ha="right")
    ax.set_ylabel("x uvloop_proto (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=len(wls) + 1)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return None
