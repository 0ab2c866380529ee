#!/usr/bin/env python3
"""
echotw benchmark: run echotw (a real `twistd -n echo` process) and its peers
one after another on 127.0.0.1 under the same C load client, and write a
markdown table, raw JSON lines and a chart to bench/results/local/ (or, with
--publish NAME, to bench/results/, refreshing the chart docs/performance.md shows).

    python3 bench/run.py                      # everything (see bench/README.md)
    python3 bench/run.py --seconds 2 --rounds 1 --only echotw,uvloop_proto

The servers run on this Python when it has twisted, uvloop and matplotlib
(always with --no-venv); otherwise the first run creates bench/.venv and
re-runs itself there.  loadgen.c is compiled into bench/build/.  The checkout
is put on PYTHONPATH for the servers, so the working tree is what gets
measured.  The scaling benchmark (--workers N) is bench/scaling.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402  (the directory is put on sys.path just above)


def parseArgs(argv: list[str]) -> argparse.Namespace:
    from servers import ECHOTW, SPECS
    from workloads import WORKLOADS

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--only",
        help="servers to run, comma-separated names or globs: " + ",".join(s.name for s in SPECS),
    )
    ap.add_argument("--workloads", help="comma-separated: " + ",".join(w.name for w in WORKLOADS))
    harness.addCommonOptions(ap, seconds=5.0, warmup=1.0, rounds=3)
    ap.add_argument(
        "--echotw",
        default=ECHOTW,
        metavar="TEMPLATE",
        help="command for echotw, with {port} (default: %(default)s)",
    )
    ap.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="NAME=TEMPLATE",
        help="add or replace a server (a shell command with {port}, run in bench/peers/)",
    )
    ap.add_argument(
        "--reference",
        metavar="DIR",
        help="also cross-check loadgen against an independent harness in DIR (optional; "
        "DIR/run.py with its own client and uvloop peer, set up by its DIR/setup.sh)",
    )
    ap.add_argument(
        "--reference-rounds",
        type=int,
        default=3,
        help="turns each side takes in the reference check (default 3)",
    )
    ap.add_argument("--no-rules", action="store_true", help="skip the access-rule micro-benchmark")
    args = ap.parse_args(argv)
    harness.checkCommonOptions(ap, args)
    if args.reference and not (Path(args.reference) / "run.py").is_file():
        ap.error(f"--reference: no run.py in {args.reference}")
    if not 1 <= args.reference_rounds <= 10:
        ap.error("--reference-rounds 1-10")
    if "{port}" not in args.echotw:
        ap.error("--echotw needs {port}")
    return args


def selectServers(args: argparse.Namespace) -> tuple[list[Any], list[str]]:
    """The specs to run, and notes on those skipped (not installed)."""
    from servers import selectSpecs

    return selectSpecs(args.echotw, args.server, args.only)


def selectWorkloads(args: argparse.Namespace) -> list[Any]:
    from workloads import WORKLOADS

    if not args.workloads:
        return list(WORKLOADS)
    names = args.workloads.split(",")
    unknown = set(names) - {w.name for w in WORKLOADS}
    if unknown:
        sys.exit(f"unknown workloads: {', '.join(sorted(unknown))}")
    return [w for w in WORKLOADS if w.name in names]


def runServer(
    spec: Any, wls: list[Any], loadgen: Path, args: argparse.Namespace, scratch: Path
) -> list[dict[str, Any]]:
    """All workloads on one server; idle10k (and any cell after a crash) on a fresh one."""
    from servers import Server
    from workloads import runCell, value

    print(f"== {spec.name}: {spec.template}", file=sys.stderr, flush=True)
    server, out = Server(spec, scratch / spec.name), []
    err = server.start()
    try:
        for i, wl in enumerate(wls):
            if err is None and (not server.alive() or (i and wl.mode == "hold")):
                server.stop()
                err = server.start()
            res = (
                {"fatal": f"server did not start: {err}"}
                if err
                else runCell(loadgen, server, wl, args)
            )
            if err is None and not server.alive() and "died" not in res.get("fatal", ""):
                res["fatal"] = (
                    res.get("fatal", "") + f" server died: {server.logTail(120)}"
                ).strip()
            res.update(server=spec.name, workload=wl.name, command=spec.template)
            out.append(res)
            v = value(res)
            shown = "-" if v is None else f"{v:,.2f}"
            print(
                f"   {wl.name:11s} {shown:>12s}  errors={res.get('errors')} other_cpu={res.get('other_cpu_pct', '-')}% {res.get('fatal', '')}",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(0.3)  # forked children exit, TCP state settles
    finally:
        server.stop()
    return out


def runAll(
    specs: list[Any], wls: list[Any], loadgen: Path, args: argparse.Namespace, jsonl: Path
) -> list[dict[str, Any]]:
    """Every server in turn, round after round."""
    return harness.runRounds(
        jsonl,
        args.rounds,
        "bench",
        lambda scratch: (runServer(spec, wls, loadgen, args, scratch) for spec in specs),
    )


def referenceCheck(
    specs: list[Any], wls: list[Any], loadgen: Path, args: argparse.Namespace, prefix: Path
) -> list[str]:
    """Our uvloop_proto figures and the reference harness's, taking turns."""
    import reference
    from servers import SPECS

    uvloop = next(s for s in SPECS if s.name == "uvloop_proto")
    scratch = Path(tempfile.mkdtemp(prefix="echotw-check-"))
    try:
        check = reference.interleaved(
            wls, args, prefix, lambda: runServer(uvloop, wls, loadgen, args, scratch)
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return reference.comparison(check, wls, args)


def rulesMicro() -> dict[str, Any]:
    """The access-rule micro-benchmark, in a child so its 100k networks leave no trace here."""
    cmd = [sys.executable, str(HERE / "rules_micro.py")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return {"error": f"rules micro-benchmark failed: {e}"}


def main(argv: list[str]) -> int:
    harness.ensureInterpreter(argv)
    harness.exitOnSigterm()
    import report
    from servers import raiseFdLimit

    args = parseArgs(argv)
    specs, notes = selectServers(args)
    wls = selectWorkloads(args)
    if not specs or not wls:
        sys.exit("nothing selected")
    nofile = raiseFdLimit()
    if nofile < 10100 and any(w.name == "idle10k" for w in wls):
        notes.append(f"- fd limit is {nofile}: idle10k needs more than 10,000")
    loadgen = harness.loadgenBinary(args.loadgen)
    if any(s.name == "epoll_echo" for s in specs):
        harness.epollEchoBinary()
    prefix = harness.outputPrefix(args)
    info = report.machine(sys.executable)
    results = runAll(specs, wls, loadgen, args, Path(f"{prefix}.jsonl"))
    extra: list[str] = []
    if args.reference:
        extra += [*referenceCheck(specs, wls, loadgen, args, prefix), ""]
    if not args.no_rules:
        micro = rulesMicro()
        extra += [*report.rulesSection(micro), ""]
        (Path(f"{prefix}-rules.json")).write_text(json.dumps(micro) + "\n")
    if notes:
        extra += ["## Notes", "", *notes, ""]
    names = [s.name for s in specs]
    chartErr = report.chart(
        results,
        names,
        [w for w in wls if w.mode != "hold"],
        Path(f"{prefix}.png"),
        f"echotw benchmark {info['date']}: ratio to uvloop_proto",
    )
    written = [f"{prefix}.md", f"{prefix}.jsonl"]
    if chartErr is None:
        extra += [f"![ratios to uvloop_proto]({prefix.name}.png)", ""]
        written.append(f"{prefix}.png")
        if args.publish:
            shutil.copyfile(f"{prefix}.png", harness.RESULTS / "latest.png")
            written.append(str(harness.RESULTS / "latest.png"))
    else:
        extra += [f"(no chart: {chartErr})", ""]
    md = report.markdown(results, names, wls, info, args, extra)
    Path(f"{prefix}.md").write_text(md)
    print(md)
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 2 if any(r.get("mismatches") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
