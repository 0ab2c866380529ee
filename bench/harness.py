"""
What both benchmark entry points (run.py and scaling.py) settle before they
measure anything: which Python runs the servers, which load client binary is
used, and where the results go.

- Python: the running interpreter when it already imports Twisted (23.10 or
  later), uvloop and matplotlib, or always with --no-venv (then a missing
  package is a one-line error; without matplotlib there is no chart);
  otherwise bench/.venv, created from PyPI on first use, and the script
  re-runs itself there.  Nothing is installed with --no-venv, so a machine
  without network can run the benchmark from packages put on PYTHONPATH.
- loadgen: compiled from loadgen.c into bench/build/ whenever the source is
  newer and gcc exists; a binary built elsewhere can be named with --loadgen.
- Results: bench/results/local/ (ignored by git) unless --publish NAME writes
  into bench/results/ (tracked, with the stable chart name docs/performance.md shows) or
  --out DIR writes into DIR.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
BUILD = HERE / "build"
RESULTS = HERE / "results"
LOCAL_RESULTS = RESULTS / "local"
PEERS = ["uvloop", "matplotlib"]
"""What the peers and the charts need besides echotw's own dependencies."""
OLDEST_TWISTED = (23, 10)


def _twistedRecentEnough() -> bool:
    try:
        version = importlib.metadata.version("twisted")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    return parts >= OLDEST_TWISTED


def requirements() -> list[str]:
    """
    echotw's run-time dependencies, as pyproject.toml names them (echotw runs
    from this checkout), and the peers'.
    """
    text = (HERE.parent / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S)
    assert block, "pyproject.toml names no dependencies"
    return [*re.findall(r'"([^"]+)"', block.group(1)), *PEERS]


def _lacking(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def ensureInterpreter(argv: list[str]) -> None:
    """
    Keep this interpreter if it can run the servers (or --no-venv says so);
    otherwise create bench/.venv once and re-execute this script inside it.
    """
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    lacking = _lacking(("twisted", "prometheus_client", "wsproto", "uvloop"))
    if "--no-venv" in argv:
        if lacking or not _twistedRecentEnough():
            missing = ", ".join(lacking) or "twisted>=23.10"
            sys.exit(f"--no-venv: {sys.executable} cannot import {missing}")
        return
    if not lacking and not _lacking(("matplotlib",)) and _twistedRecentEnough():
        return
    python = VENV / "bin" / "python"
    wanted = requirements()
    complete = VENV / ".complete"
    if not complete.exists() or complete.read_text().split() != wanted:
        print(f"== making {VENV} ({', '.join(wanted)})", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
        pip = [str(python), "-m", "pip", "install", "-q", *wanted]
        subprocess.run(pip, check=True, timeout=900)
        complete.write_text("\n".join(wanted) + "\n")
    script = Path(sys.argv[0]).resolve()
    os.execv(str(python), [str(python), str(script), *argv])


def exitOnSigterm() -> None:
    """
    SIGTERM (a timeout, a CI job cancelled) unwinds like an exception, so the
    servers started so far are stopped by the finally blocks around them.
    """

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def epollEchoBinary() -> Path:
    """
    bench/build/epoll_echo, the C epoll echo (the floor any server can
    reach), compiled from peers/epoll_echo.c whenever that is newer.
    """
    src, out = HERE / "peers" / "epoll_echo.c", BUILD / "epoll_echo"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        if shutil.which("gcc") is None:
            sys.exit("gcc is not installed: the C epoll echo cannot be built")
        BUILD.mkdir(exist_ok=True)
        cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)]
        subprocess.run(cmd, check=True, timeout=120)
    return out


def loadgenBinary(path: str | None) -> Path:
    """
    The load client: PATH when given; else bench/build/loadgen, rebuilt with
    gcc when loadgen.c is newer (and kept as it is where gcc is missing).
    """
    if path:
        given = Path(path).resolve()
        if not (given.is_file() and os.access(given, os.X_OK)):
            sys.exit(f"--loadgen: {path} is not an executable file")
        return given
    src, out = HERE / "loadgen.c", BUILD / "loadgen"
    stale = not out.exists() or out.stat().st_mtime < src.stat().st_mtime
    if shutil.which("gcc") is None:
        if not out.exists():
            sys.exit("gcc is not installed and bench/build/loadgen does not exist: pass --loadgen")
        if stale:
            print("== gcc missing: using bench/build/loadgen as it is", file=sys.stderr)
        return out
    if stale:
        BUILD.mkdir(exist_ok=True)
        cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)]
        subprocess.run(cmd, check=True, timeout=120)
    return out


def addCommonOptions(
    ap: argparse.ArgumentParser, seconds: float, warmup: float, rounds: int
) -> None:
    """The options run.py and scaling.py share, with each one's defaults."""
    ap.add_argument(
        "--seconds",
        type=float,
        default=seconds,
        help=f"measured seconds per cell (default {seconds:g})",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=warmup,
        help=f"unmeasured seconds first (default {warmup:g})",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=rounds,
        help=f"repeat everything; the median round per cell is kept (default {rounds})",
    )
    ap.add_argument(
        "--name",
        default=time.strftime("%Y%m%d-%H%M"),
        help="results file name (default: date-time)",
    )
    where = ap.add_mutually_exclusive_group()
    where.add_argument(
        "--publish",
        metavar="NAME",
        help="write the results as bench/results/NAME.* (tracked) and refresh the chart docs/performance.md shows",
    )
    where.add_argument(
        "--out", metavar="DIR", help="write the results into DIR instead of bench/results/local/"
    )
    ap.add_argument(
        "--loadgen",
        metavar="PATH",
        help="a load client binary built elsewhere (default: compile bench/loadgen.c)",
    )
    ap.add_argument(
        "--no-venv",
        action="store_true",
        help="run the servers with this Python, never creating bench/.venv",
    )
    ap.add_argument(
        "--block-client",
        action="store_true",
        help="loadgen sleeps in epoll_wait instead of polling",
    )
    ap.add_argument(
        "--noise-limit",
        type=float,
        default=10.0,
        help="flag a cell when other processes used more than this %% of a CPU",
    )


def checkCommonOptions(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (
        args.rounds < 1
        or args.rounds > 20
        or not 0 < args.seconds <= 600
        or not 0 <= args.warmup <= 60
    ):
        ap.error("--rounds 1-20, --seconds up to 600, --warmup up to 60")
    name = args.publish or args.name
    if not name or "/" in name or name.startswith("."):
        ap.error("--name/--publish: a plain file name")


def outputPrefix(args: argparse.Namespace) -> Path:
    """Where NAME.md, NAME.jsonl and NAME.png go (the folder is created)."""
    if args.publish:
        folder, name = RESULTS, args.publish
    else:
        folder, name = (Path(args.out) if args.out else LOCAL_RESULTS), args.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


Cells = list[dict[str, Any]]


def runRounds(
    jsonl: Path, rounds: int, label: str, servers: Callable[[Path], Iterable[Cells]]
) -> Cells:
    """
    ROUNDS times over SERVERS (given a scratch folder, each server's cells in
    turn), every cell marked with its round and written to JSONL as it comes,
    so an interrupted run keeps what it measured.
    """
    results: Cells = []
    scratch = Path(tempfile.mkdtemp(prefix=f"echotw-{label}-"))
    try:
        with open(jsonl, "w") as f:
            for rnd in range(rounds):
                for cells in servers(scratch):
                    for res in cells:
                        res["round"] = rnd
                        results.append(res)
                        f.write(json.dumps(res) + "\n")
                        f.flush()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results
