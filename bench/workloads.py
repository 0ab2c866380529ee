"""
The workloads, and running loadgen against a started server for one cell.

A cell's CPU figures cover the whole loadgen run (setup, warm-up, measured
time, drain): the server group's CPU from /proc/PID/stat, loadgen's from
RUSAGE_CHILDREN, both CPUs' busy share from /proc/stat, and "other", what
the rest of the machine used meanwhile.  On a shared machine other processes
disturb the figures, so a cell where "other" passes --noise-limit is flagged
as noisy.

Besides the fixed list run.py measures, parseWorkload() reads names such as
`pp1000x64`, `st80x64k` or `churn32x64` (scaling.py takes any of them).
"""

from __future__ import annotations

import json
import re
import resource
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servers import (
    CLIENT_CPU,
    SERVER_CPU,
    Server,
    cpuJiffies,
    foreignCpu,
    foreignDelta,
    groupCpuSeconds,
    groupMemory,
    pinnedTo,
)


@dataclass(frozen=True)
class Workload:
    name: str
    mode: str
    conns: int
    size: int
    title: str


WORKLOADS = [
    Workload("pp50x1k", "pingpong", 50, 1024, "pingpong 50 conns x 1 KiB: round trips/s (p99)"),
    Workload("st10x64k", "stream", 10, 65536, "stream 10 conns x 64 KiB chunks: MB/s"),
    Workload("pp1000x64", "pingpong", 1000, 64, "pingpong 1000 conns x 64 B: round trips/s (p99)"),
    Workload("churn32x64", "churn", 32, 64, "churn 32 in flight x 64 B: conns/s (p50/p99)"),
    Workload(
        "idle10k", "hold", 10000, 16, "10,000 idle conns: KiB/conn RSS (PSS), lower is better"
    ),
]
BY_NAME = {w.name: w for w in WORKLOADS}
_NAMED = re.compile(r"^(pp|st|churn)([1-9][0-9]*)x([1-9][0-9]*)(k?)$")
_MODES = {"pp": "pingpong", "st": "stream", "churn": "churn"}


def parseWorkload(name: str) -> Workload:
    """
    A workload from its name: pp (ping-pong), st (stream) or churn, then
    CONNSxSIZE, SIZE in bytes or with k for KiB: pp1000x64, st80x64k, churn32x64.
    ValueError for anything else.
    """
    match = _NAMED.match(name)
    if not match:
        raise ValueError(
            f"not a workload name (ppCONNSxSIZE, stCONNSxSIZE, churnCONNSxSIZE): {name}"
        )
    kind, conns, size, kib = match.groups()
    nbytes = int(size) * (1024 if kib else 1)
    if nbytes > 256 * 1024 or int(conns) > 100000:
        raise ValueError(f"{name}: at most 100000 connections and 256 KiB")
    shown = f"{size} KiB" if kib else f"{size} B"
    titles = {
        "pp": f"pingpong {conns} conns x {shown}: round trips/s",
        "st": f"stream {conns} conns x {shown} chunks: MB/s",
        "churn": f"churn {conns} in flight x {shown}: conns/s",
    }
    return Workload(name, _MODES[kind], int(conns), nbytes, titles[kind])


IDLE_SETUP_S = 60.0  # idle10k: limit for opening and verifying 10,000 connections
IDLE_SETTLE_S = 1.0  # idle10k: wait after the last echo before reading memory
FORK_CAP = 2000  # idle10k: connections for forking servers (one process each)


def value(res: dict[str, Any] | None) -> float | None:
    """The cell's headline: round trips/s, MB/s, conns/s, or KiB per idle connection."""
    if not res or res.get("fatal"):
        return None
    if res.get("mode") == "hold":
        return res.get("kib_per_conn")
    if res.get("mode") == "stream":
        return res.get("mb_per_s")
    return res.get("ops_per_s")


def _cpuSnapshot(server: Server) -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "server": groupCpuSeconds(server.pgid),
        "foreign": foreignCpu(server.pgid),
        "jiffies": cpuJiffies(),
        "client": usage.ru_utime + usage.ru_stime,
        "t": time.monotonic(),
    }


def _cpuFigures(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """
    Percent of one CPU.  The server's figure is CPU 0's busy share: the
    server is pinned there, and a forking server's children may be reaped
    without their time reaching any /proc/PID/stat we can read.
    """
    wall = max(after["t"] - before["t"], 1e-6)
    other, top = foreignDelta(before["foreign"], after["foreign"])
    busy = {}
    for cpu, (b1, t1) in after["jiffies"].items():
        b0, t0 = before["jiffies"].get(cpu, (b1, t1))
        busy[cpu] = round(100 * (b1 - b0) / max(t1 - t0, 1), 1)
    return {
        "cpu_server_busy_pct": busy.get(f"cpu{SERVER_CPU}", 0.0),
        "cpu_client_busy_pct": busy.get(f"cpu{CLIENT_CPU}", 0.0),
        "server_group_cpu_pct": round(100 * (after["server"] - before["server"]) / wall, 1),
        "client_cpu_pct_run": round(100 * (after["client"] - before["client"]) / wall, 1),
        "other_cpu_pct": round(100 * other / wall, 1),
        "other_top": [f"{name} {100 * secs / wall:.0f}%" for name, secs in top],
    }


def lastJson(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            return parsed
    return None


def loadgenCommand(loadgen: Path, server: Server, wl: Workload, conns: int) -> list[str]:
    cmd = [str(loadgen), "--mode", wl.mode]
    cmd += ["--port", str(server.port), "--conns", str(conns), "--size", str(wl.size)]
    return cmd


def rateCommand(loadgen: Path, server: Server, wl: Workload, conns: int, args: Any) -> list[str]:
    """loadgen for a throughput or churn cell: CONNS connections, the measured and warm-up time."""
    cmd = loadgenCommand(loadgen, server, wl, conns)
    cmd += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    return cmd + (["--block"] if args.block_client else [])


def rateLimit(args: Any) -> float:
    """How long a rate cell's loadgen may take before it is given up (its own alarm is sooner)."""
    return float(args.seconds + args.warmup + 30)


def runRate(loadgen: Path, server: Server, wl: Workload, args: Any) -> dict[str, Any]:
    """One throughput or churn cell."""
    cmd = rateCommand(loadgen, server, wl, wl.conns, args)
    before = _cpuSnapshot(server)
    limit = rateLimit(args)
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=limit,
            preexec_fn=pinnedTo([int(CLIENT_CPU)]),
        )
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        out, err, rc = "", f"loadgen did not finish in {limit:g} s", -1
    res = lastJson(out) or {"fatal": f"no result from loadgen (status {rc}): {err[-200:]}"}
    res.update(_cpuFigures(before, _cpuSnapshot(server)), rc=rc)
    if err.strip():
        res["stderr"] = err.strip()[-300:]
    return res


def runIdle(loadgen: Path, server: Server, wl: Workload, args: Any) -> dict[str, Any]:
    """
    idle10k: hold the connections, read the server's memory while they are
    held, then let them go.  The caller gives us a freshly started server.
    """
    conns = min(wl.conns, FORK_CAP) if server.spec.forking else wl.conns
    time.sleep(0.5)  # let a fresh server finish starting up
    before = groupMemory(server.pgid)
    cmd = loadgenCommand(loadgen, server, wl, conns)
    cmd += ["--setup-timeout", str(IDLE_SETUP_S), "--seconds", "60"]
    held, after, out = None, None, ""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=pinnedTo([int(CLIENT_CPU)]),
    )
    assert proc.stdin and proc.stdout and proc.stderr
    try:
        if select.select([proc.stdout], [], [], IDLE_SETUP_S + 10)[0]:
            held = lastJson(proc.stdout.readline())
        if held and held.get("event") == "held":
            time.sleep(IDLE_SETTLE_S)
            after = groupMemory(server.pgid)
            after["alive"] = int(server.alive())
        proc.stdin.write("\n")  # releases the connections; loadgen prints its result
        proc.stdin.close()
        out, err = proc.stdout.read(), proc.stderr.read()  # bounded: loadgen has an alarm
        proc.wait(timeout=30)
    except (subprocess.TimeoutExpired, BrokenPipeError):
        proc.kill()
        out, err = proc.communicate()
    res = lastJson(out) or {"fatal": f"no result from loadgen: {err.strip()[-200:]}"}
    res.update(mem_before=before, mem_after=after, asked=wl.conns, capped=conns < wl.conns)
    return _idleFigures(res, server)


def _idleFigures(res: dict[str, Any], server: Server) -> dict[str, Any]:
    ready = res.get("conns_ready") or 0
    peak = res.get("peak_ready") or ready
    after = res.get("mem_after")
    if after is None:
        res.setdefault("fatal", "connections were not held")
    elif not after.get("alive") or res.get("lost"):
        res["fatal"] = f"server lost connections or died after {peak:,} ({server.logTail(120)})"
    elif ready:
        before = res["mem_before"]
        res["kib_per_conn"] = round((after["rss_kib"] - before["rss_kib"]) / ready, 2)
        res["pss_kib_per_conn"] = round((after["pss_kib"] - before["pss_kib"]) / ready, 2)
    if ready < res.get("conns", 0) and not res.get("fatal"):
        res["fatal"] = f"only {ready:,} of {res['conns']:,} connections were served"
    return res


def runCell(loadgen: Path, server: Server, wl: Workload, args: Any) -> dict[str, Any]:
    """One server x workload measurement, as a JSON-able dict."""
    if wl.mode == "hold":
        return runIdle(loadgen, server, wl, args)
    return runRate(loadgen, server, wl, args)
