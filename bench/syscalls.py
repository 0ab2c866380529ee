"""
System calls per unit of work: per round trip, per MB streamed, per
connection, counted by the kernel's system-call tracepoints (`perf stat`)
on the server's processes while loadgen runs a throughput or churn
workload.  Like the instruction counts (instructions.py), a count no noisy
machine can move much; it shows the part of the cost the clock benchmark
is made of on machines where a system call is dear (run.py calibrates
one), and which calls a server makes that another does not.

    python3 bench/syscalls.py --only echotw,uvloop_proto,epoll_echo
    python3 bench/syscalls.py --workloads churn32x64 --seconds 3

Each cell: the server started and pinned as in run.py, loadgen started,
and after its warm-up `perf stat -e raw_syscalls:sys_enter,...` counts the
server's calls for --seconds while loadgen measures the same span; the
counts are divided by what loadgen did meanwhile (its rate times the
span).  Needs `perf` and tracepoints it may read (root, or
kernel.perf_event_paranoid -1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness

CALLS = (
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "accept4",
    "recvfrom",
    "sendto",
    "read",
    "write",
    "close",
    "shutdown",
    "setsockopt",
    "getsockopt",
    "getpeername",
    "getsockname",
)
"""The calls named in the table; every other is counted in the total only."""

UNITS = {"pingpong": "round trip", "stream": "MB", "churn": "connection"}


def parseArgs(argv: list[str]) -> argparse.Namespace:
    from servers import ECHOTW

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--only", default="echotw,uvloop_proto,epoll_echo", help="servers, by name or glob"
    )
    ap.add_argument("--workloads", default="pp50x1k,st10x64k,pp1000x64,churn32x64")
    ap.add_argument("--echotw", default=ECHOTW, help="echotw's command template ({port})")
    ap.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="NAME=TEMPLATE",
        help="one more server (its name then goes in --only), as for run.py",
    )
    ap.add_argument("--seconds", type=float, default=3.0, help="counted seconds per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds first")
    ap.add_argument("--out", metavar="PREFIX", help="write PREFIX.md and PREFIX.jsonl")
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= 60 or not 0 <= args.warmup <= 30:
        ap.error("--seconds up to 60, --warmup up to 30")
    return args


def countCell(loadgen: Path, server: Any, wl: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One workload on a started server: its calls per unit of work."""
    from servers import CLIENT_CPU, pinnedTo
    from workloads import lastJson, loadgenCommand

    # loadgen measures from its warm-up's end for --seconds plus a margin,
    # so that perf's span lies within its measured one.
    cmd = loadgenCommand(loadgen, server, wl, wl.conns)
    cmd += ["--seconds", str(args.seconds + 1), "--warmup", str(args.warmup)]
    client = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, preexec_fn=pinnedTo([int(CLIENT_CPU)])
    )
    try:
        time.sleep(args.warmup + 0.5 + (1.0 if wl.conns >= 500 else 0.0))
        events = ",".join(["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{c}" for c in CALLS)])
        counted = ["-e", events, "-p", str(server.pgid), "--", "sleep", str(args.seconds)]
        perf = subprocess.run(
            ["perf", "stat", "-x", ",", *counted],
            capture_output=True,
            text=True,
            timeout=args.seconds + 30,
        )
        out, _ = client.communicate(timeout=args.seconds + args.warmup + 60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    res = lastJson(out) or {"fatal": "no result from loadgen"}
    counts: dict[str, int] = {}
    for line in perf.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():
            name = fields[2].split(":")[-1].removeprefix("sys_enter_")
            counts["all" if name == "sys_enter" else name] = int(fields[0])
    rate = res.get("mb_per_s" if wl.mode == "stream" else "ops_per_s") or 0.0
    units = rate * args.seconds
    if not counts or units <= 0:
        return {"fatal": res.get("fatal") or f"perf counted nothing: {perf.stderr[-200:]}"}
    return {
        "unit": UNITS[wl.mode],
        "units": units,
        "perUnit": {name: n / units for name, n in counts.items()},
        "errors": res.get("errors"),
        "mismatches": res.get("mismatches"),
    }


def markdown(results: list[dict[str, Any]], command: str) -> str:
    shown = [c for c in CALLS if any(r.get("perUnit", {}).get(c, 0) >= 0.005 for r in results)]
    lines = [
        "# System calls per unit of work (perf tracepoints)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `{command}`",
        "",
        "| server | workload | per | all | " + " | ".join(shown) + " |",
        "|---|---|---|---|" + "---|" * len(shown),
    ]
    for r in results:
        if "fatal" in r:
            lines.append(f"| {r['server']} | {r['workload']} | failed: {r['fatal']} |")
            continue
        per = r["perUnit"]
        cells = [f"{per[c]:.2f}" if per.get(c, 0) >= 0.005 else "" for c in shown]
        lines.append(
            f"| {r['server']} | {r['workload']} | {r['unit']} | **{per.get('all', 0):.2f}** | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    harness.ensureInterpreter(argv)
    harness.exitOnSigterm()
    from servers import Server, selectSpecs
    from workloads import parseWorkload

    args = parseArgs(argv)
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (Debian: apt-get install linux-perf)")
    chosen, notes = selectSpecs(args.echotw, args.server, args.only)
    for note in notes:
        print(note, file=sys.stderr)
    try:
        wls = [parseWorkload(n) for n in args.workloads.split(",")]
    except ValueError as e:
        sys.exit(str(e))
    if not chosen or not wls:
        sys.exit("nothing selected")
    loadgen = harness.loadgenBinary(None)
    if any(s.name == "epoll_echo" for s in chosen):
        harness.epollEchoBinary()
    results: list[dict[str, Any]] = []
    scratch = Path(harness.LOCAL_RESULTS) / "syscalls-scratch"
    for spec in chosen:
        for wl in wls:
            server = Server(spec, scratch / spec.name)
            err = server.start()
            try:
                res = {"fatal": err} if err else countCell(loadgen, server, wl, args)
            finally:
                server.stop()
            res.update(server=spec.name, workload=wl.name)
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    md = markdown(results, " ".join(["python3 bench/syscalls.py", *argv]))
    print(md)
    if args.out:
        Path(f"{args.out}.md").write_text(md)
        Path(f"{args.out}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    bad = any(r.get("mismatches") or "fatal" in r for r in results)
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
