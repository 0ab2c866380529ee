#!/usr/bin/env python3
"""
How far --max-connections can overshoot with --workers: bursts of
connections at a server whose workers share one connection count, counting
how many each burst got admitted (echoed) against the limit.

    python3 bench/overshoot.py                       # 2 workers, limit 20, bursts of 200
    python3 bench/overshoot.py --workers 8 --limit 50 --burst 500 --rounds 20

It starts `twistd -n echo --workers N --max-connections L` from this
checkout on 127.0.0.1 (and stops it, by its process group), opens each
burst's connections without waiting for any, sends one byte on each, and
counts the echoes; every loop is bounded in count and time. The workers can
admit at most N - 1 connections over the limit, when several check the
shared count in the same microseconds (see echotw/workers/sharedcount.py).
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def admitted(port: int, burst: int, wait: float = 1.0) -> int:
    """
    Open C{burst} connections at once; how many echo one byte (a refused one
    is closed by the server without echoing).
    """
    socks = []
    try:
        for _ in range(burst):
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            socks.append(sock)
        time.sleep(wait)
        for sock in socks:
            try:
                sock.send(b"x")
            except OSError:
                pass
        echoes = 0
        waiting = list(socks)
        deadline = time.monotonic() + 5
        while waiting and time.monotonic() < deadline:
            readable, _, _ = select.select(waiting, [], [], 0.5)
            for sock in readable:
                waiting.remove(sock)
                try:
                    echoes += sock.recv(1) == b"x"
                except OSError:
                    pass
        return echoes
    finally:
        for sock in socks:
            sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="echotw-overshoot-"))
    log = workdir / "server.log"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    command = [
        sys.executable,
        "-c",
        TWISTD,
        "-n",
        "--pidfile=",
        "echo",
        "--workers",
        str(args.workers),
        "--port",
        "tcp:0:interface=127.0.0.1",
        "--max-connections",
        str(args.limit),
        "--log-connections",
        "1",
    ]
    with log.open("wb") as out:
        server = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if len(re.findall(r"echotw worker \d+\] Listening", text)) >= args.workers:
                break
            if server.poll() is not None:
                sys.exit(f"the server exited:\n{text}")
            time.sleep(0.1)
        else:
            sys.exit(f"the workers did not start:\n{text}")
        port = int(re.search(r"Listening on \S+ at 127\.0\.0\.1:(\d+)", text).group(1))
        results = []
        for _ in range(args.rounds):
            results.append(admitted(port, args.burst))
            time.sleep(1.0)
        print(
            f"workers={args.workers} limit={args.limit} burst={args.burst}: admitted {results}; "
            f"most over the limit: {max(results) - args.limit}"
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)


if __name__ == "__main__":
    main()
