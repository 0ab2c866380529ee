#!/usr/bin/env python3
"""
echotw scaling benchmark: echotw `--workers N` against N uvloop processes on
SO_REUSEPORT sockets, for N = 1, 2, 4, ... on one half of the machine's CPUs,
driven by one loadgen process per CPU of the other half.

    python3 bench/scaling.py                          # workers 1,2,4,... up to the server CPUs
    python3 bench/scaling.py --workers 1,2 --workloads st20x64k,churn32x64

It reports throughput per worker count, each worker's CPU share (so a worker
that got no connections shows as idle), the spread (lowest worker's share over
the average), the ratio to uvloop at the same process count, and scaling
efficiency (throughput at N / (N x throughput at 1)): a markdown table, raw
JSON lines and a chart, in bench/results/local/ unless --publish or --out.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402  (the directory is put on sys.path just above)

DEFAULT_WORKLOADS = "pp1000x64,st80x64k,churn32x64"
UVLOOP = "python uvloop_proto.py {port} --processes {workers}"
SETTLE_TIMEOUT_S = 30.0  # workers importing and starting their loops
SAMPLE_EVERY_S = 0.5  # connections per worker and CPUs seen, while the clients run
KINDS = ("echotw", "uvloop")


@dataclass(frozen=True)
class Plan:
    """Which CPUs serve, which drive the load, and the process counts to try."""

    serverCpus: tuple[int, ...]
    clientCpus: tuple[int, ...]
    workers: tuple[int, ...]


def defaultWorkers(serverCpus: int) -> list[int]:
    """1, 2, 4, ... up to the server CPU count (and that count itself); 1 and 2 on one CPU."""
    if serverCpus == 1:
        return [1, 2]
    counts, n = [], 1
    while n < serverCpus:
        counts.append(n)
        n *= 2
    return [*counts, serverCpus]


ECHOTW_WORKERS = (
    "twistd -n --pidfile= echo --port tcp:{port}:interface=127.0.0.1"
    " --allow 127.0.0.0/8 --workers {workers}"
)
"""
echotw for scaling: without run.py's --max-per-ip, because a per-source
limit steers every connection of one source to one worker (so that the limit
holds exactly), and every load client here connects from 127.0.0.1.
"""


def parseArgs(argv: list[str]) -> argparse.Namespace:

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.addCommonOptions(ap, seconds=5.0, warmup=1.0, rounds=1)
    ap.add_argument("--workers", help="process counts, comma-separated (default: 1,2,4,...)")
    ap.add_argument(
        "--server-cpus", help="CPUs for the servers, e.g. 0-7 (default: the first half)"
    )
    ap.add_argument(
        "--client-cpus",
        help="CPUs for the load clients, one loadgen each, e.g. 8-15 (default: the rest)",
    )
    ap.add_argument(
        "--workloads",
        default=DEFAULT_WORKLOADS,
        help="comma-separated ppCONNSxSIZE, stCONNSxSIZE, churnCONNSxSIZE "
        "(k: KiB; pp and st connections are split over the clients, churn's are per "
        "client) (default: %(default)s)",
    )
    ap.add_argument("--only", help="echotw, uvloop or both (default: both)")
    ap.add_argument(
        "--echotw",
        default=ECHOTW_WORKERS,
        metavar="TEMPLATE",
        help="command for echotw, with {port} and {workers} (default: %(default)s)",
    )
    ap.add_argument(
        "--uvloop",
        default=UVLOOP,
        metavar="TEMPLATE",
        help="command for the uvloop peer, run in bench/peers/ (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    harness.checkCommonOptions(ap, args)
    for name in ("echotw", "uvloop"):
        template = getattr(args, name)
        if "{port}" not in template or "{workers}" not in template:
            ap.error(f"--{name} needs {{port}} and {{workers}}")
    args.kinds = KINDS if not args.only else tuple(k for k in KINDS if k in args.only.split(","))
    if not args.kinds or (args.only and set(args.only.split(",")) - set(KINDS)):
        ap.error("--only: echotw, uvloop or echotw,uvloop")
    try:
        args.plan = cpuPlan(args)
        args.wls = workloadList(args.workloads)
    except ValueError as e:
        ap.error(str(e))
    return args


def cpuPlan(args: argparse.Namespace) -> Plan:
    from servers import parseCpus

    allowed = sorted(os.sched_getaffinity(0))
    if args.server_cpus or args.client_cpus:
        if not (args.server_cpus and args.client_cpus):
            raise ValueError("--server-cpus and --client-cpus go together")
        try:
            server, client = parseCpus(args.server_cpus), parseCpus(args.client_cpus)
        except ValueError:
            raise ValueError("--server-cpus/--client-cpus: lists such as 0-7 or 0,2,4") from None
        if set(server) & set(client):
            raise ValueError("--server-cpus and --client-cpus overlap")
        if not set(server + client) <= set(allowed):
            raise ValueError(f"CPUs outside this process's set {allowed}")
    else:
        if len(allowed) < 2:
            raise ValueError("needs at least 2 CPUs (one for servers, one for clients)")
        half = len(allowed) // 2
        server, client = allowed[:half], allowed[half:]
    if args.workers:
        try:
            workers = [int(w) for w in args.workers.split(",")]
        except ValueError:
            raise ValueError(f"--workers: comma-separated counts, not {args.workers!r}") from None
    else:
        workers = defaultWorkers(len(server))
    if not all(1 <= w <= 256 for w in workers):
        raise ValueError("--workers: counts from 1 to 256")
    return Plan(tuple(server), tuple(client), tuple(workers))


def workloadList(names: str) -> list[Any]:
    from workloads import parseWorkload

    wls = [parseWorkload(n) for n in names.split(",")]
    if any(w.mode == "hold" for w in wls):
        raise ValueError("--workloads: idle10k is run.py's; here ping-pong, stream, churn")
    return wls


def splitConns(wl: Any, clients: int) -> list[int]:
    """Connections per loadgen: pp and st share the total out, churn's count is per client."""
    if wl.mode == "churn":
        return [wl.conns] * clients
    k = min(clients, wl.conns)
    return [wl.conns // k + (i < wl.conns % k) for i in range(k)]


# --- the server's processes ------------------------------------------------


def roles(server: Any) -> tuple[int | None, list[int]]:
    """(supervisor or None, workers): a lone process is its own worker."""
    from servers import treePids

    tree = treePids(server.pgid)
    return (None, tree) if len(tree) == 1 else (tree[0], tree[1:])


def waitSettled(server: Any, workers: int) -> str | None:
    """
    Wait until the server has its workers and all of them sit idle in their
    loops (CPU time still for 0.3 s); None, or why not.
    """
    from servers import processCpuSeconds

    expected = workers  # with one, the lone process serves
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last: dict[int, float | None] = {}
    found: list[int] = []
    while time.monotonic() < deadline:
        if not server.alive():
            return f"exited: {server.logTail()}"
        supervisor, found = roles(server)
        now = {pid: processCpuSeconds(pid) for pid in ([supervisor] if supervisor else []) + found}
        settled = all(
            v is not None and last.get(p) is not None and v - (last[p] or 0) < 0.02
            for p, v in now.items()
        )
        if len(found) == expected and settled:
            return None
        last = now
        time.sleep(0.3)
    return f"{len(found)} of {expected} workers, not idle after {SETTLE_TIMEOUT_S:g} s"


# --- one cell ----------------------------------------------------------------


def combine(parts: list[dict[str, Any]], wl: Any) -> dict[str, Any]:
    """The clients' JSON lines as one cell: rates added up, the worst latency kept."""
    fatal = [f"client {i}: {p['fatal']}" for i, p in enumerate(parts) if p.get("fatal")]

    def total(key: str) -> float:
        return sum(p.get(key) or 0 for p in parts)

    perS = [p.get("per_s") or [] for p in parts]
    res: dict[str, Any] = {
        "mode": wl.mode,
        "conns": total("conns"),
        "size": wl.size,
        "clients": len(parts),
        "ops_per_s": round(total("ops_per_s"), 1),
        "mb_per_s": round(total("mb_per_s"), 2),
        "errors": total("errors"),
        "timeouts": total("timeouts"),
        "mismatches": total("mismatches"),
        "p99_us": max((p.get("p99_us") or 0 for p in parts), default=0),
        "seconds": min((p.get("seconds") or 0 for p in parts), default=0),
        "last_progress_s": min((p.get("last_progress_s") or 0 for p in parts), default=0),
        "per_s": [round(sum(col), 1) for col in zip(*perS, strict=False)] if all(perS) else [],
        "client_idle_pct": round(total("client_idle_pct") / max(len(parts), 1), 1),
    }
    if fatal:
        res["fatal"] = "; ".join(fatal)
    return res


def _shares(
    before: dict[int, float | None], after: dict[int, float | None], wall: float
) -> list[float | None]:
    out = []
    for pid, b in before.items():
        a = after.get(pid)
        out.append(None if a is None or b is None else round(100 * (a - b) / wall, 1))
    return out


def startClients(loadgen: Path, server: Any, wl: Any, args: argparse.Namespace) -> list[Any]:
    """One loadgen per client CPU, pinned to it, all at once."""
    from servers import pinnedTo
    from workloads import rateCommand

    cpus = args.plan.clientCpus
    return [
        subprocess.Popen(
            rateCommand(loadgen, server, wl, conns, args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=pinnedTo([cpu]),
        )
        for cpu, conns in zip(cpus, splitConns(wl, len(cpus)), strict=False)
    ]


def watchClients(
    procs: list[Any], base: dict[int, int], tree: list[int], wl: Any, deadline: float
) -> tuple[dict[int, int], set[int], set[int]]:
    """
    While the clients run: the connections each worker holds at the peak
    (sockets beyond BASE, those it held before), and the CPUs server and
    clients were seen on.
    """
    from servers import lastCpu, socketCount

    workers = list(base)
    peak = {pid: 0 for pid in workers}
    seenServer: set[int] = set()
    seenClient: set[int] = set()
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if wl.mode != "churn":
            conns = {pid: socketCount(pid) - base[pid] for pid in workers}
            if sum(conns.values()) > sum(peak.values()):
                peak = conns
        seenServer.update(c for c in map(lastCpu, tree) if c is not None)
        running = [p.pid for p in procs if p.poll() is None]
        seenClient.update(c for c in map(lastCpu, running) if c is not None)
        time.sleep(SAMPLE_EVERY_S)
    return peak, seenServer, seenClient


def collectClients(procs: list[Any], deadline: float) -> list[dict[str, Any]]:
    """Each client's JSON line (or why there is none)."""
    from workloads import lastJson

    parts = []
    for i, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its pid
            out, err = proc.communicate()
        part = lastJson(out) or {
            "fatal": f"no result (status {proc.returncode}): {err.strip()[-160:]}"
        }
        if err.strip():
            part.setdefault("stderr", err.strip()[-200:])
        if part.get("mismatches"):
            print(f"   client {i}: {err.strip()[-300:]}", file=sys.stderr)
        parts.append(part)
    return parts


def measure(loadgen: Path, server: Any, wl: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One cell: every client process at once, the server's processes read from /proc."""
    from servers import (
        foreignCpu,
        foreignDelta,
        processCpuSeconds,
        processUserSeconds,
        socketCount,
    )
    from workloads import rateLimit

    supervisor, workers = roles(server)
    tree = ([supervisor] if supervisor else []) + workers
    sockets = {pid: socketCount(pid) for pid in workers}
    cpu0 = {pid: processCpuSeconds(pid) for pid in tree}
    user0 = {pid: processUserSeconds(pid) for pid in tree}
    foreign0, usage0, t0 = foreignCpu(server.pgid), _childCpu(), time.monotonic()
    deadline = t0 + rateLimit(args)
    procs = startClients(loadgen, server, wl, args)
    try:
        peak, seenServer, seenClient = watchClients(procs, sockets, tree, wl, deadline)
        parts = collectClients(procs, deadline)
    finally:
        for proc in procs:  # only if interrupted: our own children, by pid
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    wall = max(time.monotonic() - t0, 1e-6)
    cpu1 = {pid: processCpuSeconds(pid) for pid in tree}
    user1 = {pid: processUserSeconds(pid) for pid in tree}
    other, top = foreignDelta(foreign0, foreignCpu(server.pgid))
    res = combine(parts, wl)
    shares = _shares(cpu0, cpu1, wall)
    userShares = _shares(user0, user1, wall)
    workerShares = shares[1:] if supervisor else shares
    known = [s for s in workerShares if s is not None]
    res.update(
        worker_cpu_pct=workerShares,
        supervisor_cpu_pct=shares[0] if supervisor else None,
        server_cpu_pct=round(sum(s for s in shares if s is not None), 1),
        server_user_pct=round(sum(s for s in userShares if s is not None), 1),
        spread=round(min(known) / (sum(known) / len(known)), 2) if known and sum(known) else None,
        worker_conns=[peak[p] for p in workers] if wl.mode != "churn" else None,
        workers_replaced=sum(1 for s in workerShares if s is None),
        server_cpus_seen=sorted(seenServer),
        client_cpus_seen=sorted(seenClient),
        client_cpu_pct_run=round(100 * (_childCpu() - usage0) / wall, 1),
        other_cpu_pct=round(100 * other / wall, 1),
        other_top=[f"{name} {100 * secs / wall:.0f}%" for name, secs in top],
        wall_s=round(wall, 2),
    )
    return res


def _childCpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- the run -----------------------------------------------------------------


def runServer(
    kind: str, workers: int, loadgen: Path, args: argparse.Namespace, scratch: Path
) -> list[dict[str, Any]]:
    """All workloads on one server with WORKERS processes (restarted if it dies)."""
    from servers import Server, Spec
    from workloads import value

    template = getattr(args, kind).replace("{workers}", str(workers))
    label = f"{kind}/{workers}"
    print(f"== {label}: {template}", file=sys.stderr, flush=True)
    server = Server(Spec(label, template), scratch / label.replace("/", "-"), args.plan.serverCpus)
    out = []
    err = server.start() or waitSettled(server, workers)
    try:
        for wl in args.wls:
            if err is None and not server.alive():
                server.stop()
                err = server.start() or waitSettled(server, workers)
            res: dict[str, Any] = (
                {"fatal": f"server did not start: {err}"}
                if err
                else measure(loadgen, server, wl, args)
            )
            if err is None and not server.alive():
                res["fatal"] = (
                    res.get("fatal", "") + f" server died: {server.logTail(120)}"
                ).strip()
            res.update(server=label, kind=kind, workers=workers, workload=wl.name, command=template)
            out.append(res)
            v = value(res)
            print(
                f"   {wl.name:11s} {'-' if v is None else f'{v:,.1f}':>12s}"
                f"  workers%={res.get('worker_cpu_pct')} conns={res.get('worker_conns')}"
                f" errors={res.get('errors')} {res.get('fatal', '')}",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(0.3)  # TCP state settles between cells
    finally:
        server.stop()
    return out


def runAll(loadgen: Path, args: argparse.Namespace, jsonl: Path) -> list[dict[str, Any]]:
    """echotw and uvloop take turns at each process count, round after round."""
    return harness.runRounds(
        jsonl,
        args.rounds,
        "scaling",
        lambda scratch: (
            runServer(kind, workers, loadgen, args, scratch)
            for workers in args.plan.workers
            for kind in args.kinds
        ),
    )


def main(argv: list[str]) -> int:
    harness.ensureInterpreter(argv)
    harness.exitOnSigterm()
    import report
    import scaling_report
    from servers import raiseFdLimit

    args = parseArgs(argv)
    raiseFdLimit()
    loadgen = harness.loadgenBinary(args.loadgen)
    # the harness's own sampling stays off the servers' CPUs
    os.sched_setaffinity(0, args.plan.clientCpus)
    prefix = harness.outputPrefix(args)
    info = report.machine(sys.executable)
    results = runAll(loadgen, args, Path(f"{prefix}.jsonl"))
    chart = Path(f"{prefix}.png")
    chartErr = scaling_report.chart(results, args, info, chart)
    md = scaling_report.markdown(results, args, info, None if chartErr else chart.name, chartErr)
    Path(f"{prefix}.md").write_text(md)
    written = [f"{prefix}.md", f"{prefix}.jsonl"] + ([] if chartErr else [str(chart)])
    if args.publish and not chartErr:
        shutil.copyfile(chart, harness.RESULTS / "scaling.png")
        written.append(str(harness.RESULTS / "scaling.png"))
    print(md)
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 2 if any(r.get("mismatches") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
