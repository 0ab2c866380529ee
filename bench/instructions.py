#!/usr/bin/env python3
"""
User-space instructions per unit of work, counted by valgrind's callgrind:
a figure no noisy machine can move, so a change in the hot path can be
judged on any machine (bench/README.md, "Instructions per unit of work").

    python3 bench/instructions.py                       # all servers, 4 workloads, a few minutes
    python3 bench/instructions.py --only echotw,uvloop_proto --workloads pp50x1k
    python3 bench/instructions.py --variant native-off='--native off'

Each server runs under `valgrind --tool=callgrind --instr-atstart=no`, one
process, pinned to one CPU.  For each workload loadgen first runs a tenth of
the work unmeasured (warm-up), then opens its connections, and only once they
are set up is instrumentation switched on (callgrind_control); loadgen does
exactly --count units of work, verifying every byte, and when the server has
gone idle instrumentation is switched off and the counters are dumped before
loadgen closes anything.  The instructions are divided by the units done:
round trips, MB (10^6 bytes) echoed, connections.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import select
import shlex
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
from instructions_report import markdown  # noqa: E402

TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
# echotw as a cautious operator runs it; --log-level warn because the peers log nothing
ECHOTW_ARGS = (
    "-n --pidfile= echo --port tcp:{port}:interface=127.0.0.1"
    " --allow 127.0.0.0/8 --max-per-ip 100000 --log-level warn --workers 1"
)


@dataclass(frozen=True)
class Work:
    """A bounded workload: loadgen's mode, connections, message size, and units of work."""

    name: str
    mode: str
    conns: int
    size: int
    count: int  # round trips, bytes echoed or connections at --scale 1
    unit: str
    title: str

    def units(self, res: dict[str, Any]) -> float:
        """The work loadgen reports done: round trips, MB (10^6 bytes) echoed, connections."""
        if self.mode == "stream":
            return float(res.get("bytes") or 0) / 1e6
        return float(res.get("ops") or 0)


WORKS = [
    Work("pp50x1k", "pingpong", 50, 1024, 4000, "round trip", "round trip, 50 conns x 1 KiB"),
    Work("pp200x64", "pingpong", 200, 64, 4000, "round trip", "round trip, 200 conns x 64 B"),
    Work("st4x64k", "stream", 4, 65536, 32_000_000, "MB", "MB streamed, 4 conns x 64 KiB"),
    Work("churn8x64", "churn", 8, 64, 800, "connection", "connection (churn, 8 in flight)"),
]


@dataclass(frozen=True)
class Peer:
    """A server: its argv template ({python}, {port}, {build}) and its column title."""

    name: str
    argv: str
    title: str


PEERS = [
    Peer("epoll_echo", "{build}/epoll_echo {port}", "C epoll echo (the limit)"),
    Peer("uvloop_proto", "{python} uvloop_proto.py {port}", "uvloop Protocol"),
    Peer("echotw", "{python} -c {twistd} " + ECHOTW_ARGS, "echotw"),
    Peer("asyncio_proto", "{python} asyncio_proto.py {port}", "asyncio Protocol"),
    Peer("twisted_naive", "{python} twisted_naive.py {port}", "textbook Twisted"),
]


def parseArgs(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", help="servers, names or globs: " + ",".join(p.name for p in PEERS))
    ap.add_argument("--workloads", help="comma-separated: " + ",".join(w.name for w in WORKS))
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply every workload's count (default 1)"
    )
    ap.add_argument(
        "--echotw-args", default="", metavar="ARGS", help="more options for every echotw row"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="one more echotw row, echotw-NAME, with these options added (repeatable)",
    )
    ap.add_argument("--server-cpu", type=int, default=0, help="CPU the server is pinned to (0)")
    ap.add_argument("--client-cpu", type=int, default=1, help="CPU loadgen is pinned to (1)")
    ap.add_argument("--name", default=time.strftime("%Y%m%d-%H%M") + "-instructions")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--publish", metavar="NAME", help="write bench/results/NAME.* (tracked)")
    where.add_argument("--out", metavar="DIR", help="write into DIR, not bench/results/local/")
    ap.add_argument("--loadgen", metavar="PATH", help="a load client binary built elsewhere")
    ap.add_argument("--no-venv", action="store_true", help="never create bench/.venv")
    args = ap.parse_args(argv)
    if not 0.01 <= args.scale <= 100:
        ap.error("--scale 0.01-100")
    name = args.publish or args.name
    if not name or "/" in name or name.startswith("."):
        ap.error("--name/--publish: a plain file name")
    for opts in [args.echotw_args, *(v.partition("=")[2] for v in args.variant)]:
        if re.search(r"--workers(=|\s+)(?!1\b)", opts):
            ap.error("callgrind follows one process: echotw runs with --workers 1")
    return args


def selectPeers(args: argparse.Namespace) -> list[Peer]:
    """The servers to run, echotw variants right after echotw."""
    extra = f" {args.echotw_args}" if args.echotw_args else ""
    chosen: list[Peer] = []
    for peer in PEERS:
        if peer.name != "echotw":
            chosen.append(peer)
            continue
        chosen.append(Peer("echotw", peer.argv + extra, "echotw"))
        for item in args.variant:
            name, sep, opts = item.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                sys.exit(f"--variant wants NAME=ARGS (NAME: letters, digits, - _ .): {item!r}")
            chosen.append(Peer(f"echotw-{name}", f"{peer.argv}{extra} {opts}", f"echotw {name}"))
    if args.only:
        pats = args.only.split(",")
        chosen = [p for p in chosen if any(fnmatch.fnmatch(p.name, pat) for pat in pats)]
    return chosen


def selectWorks(args: argparse.Namespace) -> list[Work]:
    if not args.workloads:
        return list(WORKS)
    names = args.workloads.split(",")
    unknown = set(names) - {w.name for w in WORKS}
    if unknown:
        sys.exit(f"unknown workloads: {', '.join(sorted(unknown))}")
    return [w for w in WORKS if w.name in names]


def pinned(cpu: int, argv: list[str]) -> tuple[list[str], Any]:
    """ARGV pinned to CPU: through taskset where installed, else sched_setaffinity."""
    from servers import pinnedTo

    if shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *argv], None
    return argv, pinnedTo([cpu])


def control(pid: int, *opts: str) -> None:
    """callgrind_control OPTS PID (through vgdb), bounded in time."""
    subprocess.run(
        ["callgrind_control", *opts, str(pid)], check=True, capture_output=True, timeout=60
    )


def waitIdle(pid: int, quiet: float = 0.3, limit: float = 15.0) -> None:
    """Until the server's CPU time has not moved for QUIET seconds (at most LIMIT)."""
    from servers import processCpuSeconds

    deadline, last = time.monotonic() + limit, processCpuSeconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = processCpuSeconds(pid)
        if now == last:
            return
        last = now


def readLine(proc: subprocess.Popen[str], limit: float) -> dict[str, Any] | None:
    """loadgen's next JSON line, or None if none comes within LIMIT seconds."""
    from workloads import lastJson

    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], limit)[0]:
        return None
    return lastJson(proc.stdout.readline())


def totals(outfile: str, label: str, limit: float = 30.0) -> int | None:
    """Ir of the dump labelled LABEL, from callgrind's output files OUTFILE.*."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for path in sorted(Path(outfile).parent.glob(Path(outfile).name + "*")):
            text = path.read_text(errors="replace")
            if f"Trigger: Client Request: {label}" in text or f"dump {label}\n" in text:
                match = re.search(r"^totals: (\d+)", text, re.M)
                if match:
                    return int(match.group(1))
        time.sleep(0.2)
    return None


class Measured:
    """One server under callgrind: started once, then one call per workload."""

    def __init__(self, peer: Peer, loadgen: Path, args: argparse.Namespace, scratch: Path):
        from servers import freePort, serverEnv

        self.peer, self.loadgen, self.args = peer, loadgen, args
        self.port = freePort()
        self.outfile = str(scratch / f"{peer.name}.cg")
        self.log = scratch / f"{peer.name}.log"
        fields = {"python": sys.executable, "build": str(harness.BUILD), "port": self.port}
        words = [w.format(**fields) for w in shlex.split(peer.argv.replace("{twistd}", "TWISTD"))]
        self.command = [TWISTD if w == "TWISTD" else w for w in words]
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=no"]
        argv, preexec = pinned(args.server_cpu, [*valgrind, f"--callgrind-out-file={self.outfile}"])
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*argv, *self.command],
                cwd=HERE / "peers",
                env=serverEnv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )

    def waitReady(self, limit: float = 120.0) -> str | None:
        from servers import portAccepts

        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with status {self.proc.returncode}: {self.logTail()}"
            if portAccepts(self.port):
                return None
            time.sleep(0.5)
        return f"port not accepting after {limit:g} s"

    def logTail(self) -> str:
        """The server's last line of its own (valgrind's lines start with ==PID==)."""
        lines = self.log.read_text(errors="replace").strip().splitlines()
        own = [line for line in lines if line.strip() and not line.startswith("==")]
        return own[-1][-200:] if own else ""

    def loadgenArgv(self, work: Work, count: int) -> list[str]:
        return [
            str(self.loadgen), "--mode", work.mode, "--port", str(self.port),
            "--conns", str(work.conns), "--size", str(work.size), "--count", str(count),
            "--seconds", "300", "--setup-timeout", "60",
        ]  # fmt: skip

    def warmUp(self, work: Work, count: int) -> None:
        """A tenth of the work with instrumentation off: first-use costs stay out of the count."""
        argv, preexec = pinned(self.args.client_cpu, self.loadgenArgv(work, max(1, count // 10)))
        subprocess.run(argv, capture_output=True, timeout=400, preexec_fn=preexec)

    def measure(self, work: Work) -> dict[str, Any]:
        count = max(1, round(work.count * self.args.scale))
        self.warmUp(work, count)
        argv, preexec = pinned(self.args.client_cpu, [*self.loadgenArgv(work, count), "--gate"])
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=preexec,
        )  # fmt: skip
        assert proc.stdin is not None
        res: dict[str, Any] | None = None
        ir = None
        try:
            ready = readLine(proc, 90)
            if ready and ready.get("event") == "ready":
                control(self.proc.pid, "--zero")
                control(self.proc.pid, "--instr=on")
                proc.stdin.write("\n")
                proc.stdin.flush()
                res = readLine(proc, 400)
                waitIdle(self.proc.pid)  # the last closes and wake-ups are part of the work
                control(self.proc.pid, "--instr=off")
                control(self.proc.pid, f"--dump={work.name}")
                ir = totals(self.outfile, work.name)
            proc.stdin.write("\n")
            proc.stdin.close()
            proc.wait(timeout=60)
        except (subprocess.SubprocessError, OSError) as e:
            proc.kill()
            proc.wait()
            res = {**(res or {}), "fatal": f"{type(e).__name__}: {e}"}
        return self.figures(work, res, ir, proc.returncode, proc.stderr)

    def figures(
        self, work: Work, res: dict[str, Any] | None, ir: int | None, rc: int | None, err: Any
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"server": self.peer.name, "workload": work.name, "unit": work.unit}
        if res is None:
            tail = err.read()[-200:] if err else ""
            return {**out, "fatal": f"no result from loadgen (status {rc}) {tail}".strip()}
        units = work.units(res)
        out.update(units=units, instructions=ir, loadgen=res)
        out.update({k: res.get(k, 0) for k in ("errors", "timeouts", "mismatches")})
        if res.get("fatal"):
            out["fatal"] = res["fatal"]
        elif ir is None:
            out["fatal"] = "no callgrind dump"
        elif not units:
            out["fatal"] = "no work done"
        else:
            out["per_unit"] = ir / units
        return out

    def stop(self) -> None:
        from servers import Server, Spec

        server = Server(Spec(self.peer.name, ""), Path(self.outfile).parent)
        server.proc = self.proc  # the same group-wide SIGTERM, then SIGKILL
        server.stop()


def shown(peer: Peer) -> str:
    """The command as a reader would type it."""
    text = peer.argv.replace("{python} -c {twistd}", "twistd")
    return text.format(python="python", build="bench/build", port="{port}")


def runPeer(peer: Peer, works: list[Work], loadgen: Path, args: Any, scratch: Path) -> list[Any]:
    print(f"== {peer.name}: {peer.argv}", file=sys.stderr, flush=True)
    server = Measured(peer, loadgen, args, scratch)
    out = []
    try:
        err = server.waitReady()
        for work in works:
            if err is None and server.proc.poll() is not None:
                err = f"died: {server.logTail()}"
            res = server.measure(work) if err is None else {"fatal": err}
            res.update(server=peer.name, workload=work.name, unit=work.unit)
            res["command"] = shown(peer)
            out.append(res)
            got = res.get("fatal") or f"{res['per_unit']:,.0f} per {work.unit}"
            print(f"   {work.name:10s} {got}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return out


def machine() -> str:
    """What the counts depend on: the interpreter and libraries more than the CPU."""
    import importlib.metadata
    import os
    import platform

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}; "
        f"Python {platform.python_version()}, Twisted {version('twisted')}, "
        f"uvloop {version('uvloop')}, {valgrind.stdout.strip()}"
    )


def main(argv: list[str]) -> int:
    harness.ensureInterpreter(argv)
    harness.exitOnSigterm()
    args = parseArgs(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install -y valgrind)")
    from servers import raiseFdLimit

    raiseFdLimit()
    peers, works = selectPeers(args), selectWorks(args)
    if not peers or not works:
        sys.exit("nothing selected")
    if any(p.name == "epoll_echo" for p in peers):
        harness.epollEchoBinary()
    loadgen = harness.loadgenBinary(args.loadgen)
    prefix = harness.outputPrefix(args)
    jsonl = Path(f"{prefix}.jsonl")
    results = harness.runRounds(
        jsonl, 1, "instr", lambda s: (runPeer(p, works, loadgen, args, s) for p in peers)
    )
    cmd = shlex.join(["python3", "bench/instructions.py", *argv])
    md = markdown(results, peers, works, args.scale, cmd, machine())
    Path(f"{prefix}.md").write_text(md)
    print(md)
    print(f"wrote {prefix}.md, {jsonl}", file=sys.stderr)
    return 2 if any(r.get("mismatches") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
