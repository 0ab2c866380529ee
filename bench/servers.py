"""
The servers under test: their command templates, and starting, watching and
stopping them.

Each server runs as `sh -c "ulimit -n N; exec COMMAND"` in bench/peers/, with
`python` and `twistd` on PATH running the benchmark's own interpreter and the
checkout on PYTHONPATH (so `twistd echo` runs the working tree, not an
installed copy), pinned to the server CPUs, in a process group of its own.
Stopping signals that group only: the harness never touches a process it did
not start.
"""

from __future__ import annotations

import atexit
import fnmatch
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "peers"
SERVER_CPU = "0"
CLIENT_CPU = "1"

ECHOTW = (
    "twistd -n --pidfile= echo --port tcp:{port}:interface=127.0.0.1"
    " --allow 127.0.0.0/8 --max-per-ip 100000"
)


@dataclass(frozen=True)
class Spec:
    """A server: its template ({port}, {tmp}), the program it needs, whether it forks."""

    name: str
    template: str
    needs: str = ""
    forking: bool = False


SPECS = [
    Spec("echotw", ECHOTW),
    Spec("twisted_naive", "python twisted_naive.py {port}"),
    Spec("asyncio_proto", "python asyncio_proto.py {port}"),
    Spec("asyncio_streams", "python asyncio_streams.py {port}"),
    Spec("uvloop_proto", "python uvloop_proto.py {port}"),
    # The floor: built by run.py when chosen (bench/build/, beside peers/).
    Spec("epoll_echo", "../build/epoll_echo {port}"),
    Spec("asyncore_echo", "python asyncore_echo.py {port}"),
    Spec(
        "socat",
        "socat TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024 PIPE",
        needs="socat",
        forking=True,
    ),
    Spec("xinetd", "python xinetd_echo.py {port} {tmp}", needs="xinetd", forking=True),
    Spec(
        "tcpserver",
        "tcpserver -c 10100 -b 1024 -H -R -l 0 127.0.0.1 {port} /bin/cat",
        needs="tcpserver",
        forking=True,
    ),
]


def freePort() -> int:
    """A port the kernel just handed out on loopback (closed again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def portAccepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def pinnedTo(cpus: Iterable[int]) -> Callable[[], None]:
    """A preexec_fn that pins the child to CPUS (no taskset needed)."""
    chosen = set(cpus)

    def pin() -> None:
        os.sched_setaffinity(0, chosen)

    return pin


def parseCpus(text: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8]; ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        first, last = int(low), int(high) if sep else int(low)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


_shims: list[Path] = []


def interpreterBin() -> Path:
    """
    A scratch bin/ whose `python`, `python3` and `twistd` run this very
    interpreter, so server templates work the same in bench/.venv and with
    packages put on PYTHONPATH (--no-venv).  Made once per harness run.
    """
    if not _shims:
        folder = Path(tempfile.mkdtemp(prefix="echotw-bench-bin-"))
        atexit.register(shutil.rmtree, folder, True)
        python = shlex.quote(sys.executable)
        twistd = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
        scripts = {
            "python": f'exec {python} "$@"',
            "python3": f'exec {python} "$@"',
            "twistd": f'exec {python} -c "{twistd}" "$@"',
        }
        for name, line in scripts.items():
            (folder / name).write_text(f"#!/bin/sh\n{line}\n")
            (folder / name).chmod(0o755)
        _shims.append(folder)
    return _shims[0]


def serverEnv() -> dict[str, str]:
    """PATH with this interpreter first; PYTHONPATH with the checkout, for `twistd echo`."""
    env = dict(os.environ)
    env["PATH"] = f"{interpreterBin()}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("PYTHONHOME", None)
    return env


def missing(spec: Spec) -> str | None:
    """Why this server cannot run here, or None."""
    if spec.needs and shutil.which(spec.needs) is None:
        return f"{spec.needs} is not installed"
    return None


def selectSpecs(echotw: str, extra: list[str], only: str) -> tuple[list[Spec], list[str]]:
    """
    The servers to run: the peers, echotw from its template ECHOTW, and each
    of EXTRA's NAME=TEMPLATE, narrowed to ONLY's names or globs (all when
    empty); and notes on those skipped (not installed).  A malformed EXTRA
    item ends the run with one line.
    """
    specs = {s.name: s for s in SPECS}
    specs["echotw"] = Spec("echotw", echotw)
    for item in extra:
        name, sep, template = item.partition("=")
        if not sep or "{port}" not in template:
            sys.exit(f"--server wants NAME=TEMPLATE with {{port}}: {item!r}")
        specs[name] = Spec(name, template)
    if only:
        patterns = only.split(",")
        specs = {n: s for n, s in specs.items() if any(fnmatch.fnmatch(n, p) for p in patterns)}
    chosen, notes = [], []
    for spec in specs.values():
        why = missing(spec)
        if why:
            notes.append(f"- {spec.name} skipped: {why}")
        else:
            chosen.append(spec)
    return chosen, notes


@dataclass
class Server:
    """One running server process group."""

    spec: Spec
    scratch: Path
    cpus: tuple[int, ...] = (int(SERVER_CPU),)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    logPath: Path = field(init=False)

    def __post_init__(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.logPath = self.scratch / "server.log"

    def start(self, timeout: float = 20.0) -> str | None:
        """Start it and wait for its port; None, or why it did not come up."""
        self.port = freePort()
        command = self.spec.template.format(port=self.port, tmp=self.scratch)
        nofile = _nofileLimit()
        script = f"ulimit -n {nofile} || exit 111\nexec {command}"
        with open(self.logPath, "ab") as log:
            self.proc = subprocess.Popen(
                ["sh", "-c", script],
                cwd=PEERS,
                env=serverEnv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pinnedTo(self.cpus),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with status {self.proc.returncode}: {self.logTail()}"
            if portAccepts(self.port):
                return None
            time.sleep(0.1)
        return f"port {self.port} not accepting after {timeout:g} s: {self.logTail()}"

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logTail(self, chars: int = 200) -> str:
        try:
            lines = self.logPath.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][-chars:] if lines else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, our own process group (the server and its forks)."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=4)
            except subprocess.TimeoutExpired:
                continue
            if not _groupAlive(self.pgid):
                break
        if self.proc.poll() is None:
            self.proc.wait(timeout=2)
        self.proc = None


def _groupAlive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _nofileLimit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raiseFdLimit() -> int:
    """Soft fd limit up to the hard one: idle10k needs 10,000 sockets per side."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- /proc accounting -------------------------------------------------------


def _procStat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def groupPids(pgid: int) -> list[int]:
    """Processes of one process group (the server and anything it forked)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _procStat(int(entry))
            if fields is not None and int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def treePids(root: int) -> list[int]:
    """ROOT and every process below it (by parent pid), ROOT first, then by start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _procStat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append((int(fields[19]), int(entry)))
    out, todo = [root], [root]
    while todo and len(out) < 10000:
        for _, pid in sorted(children.get(todo.pop(), [])):
            out.append(pid)
            todo.append(pid)
    return out


def processCpuSeconds(pid: int) -> float | None:
    """utime + stime of one process (its own, not its reaped children's), or None if gone."""
    fields = _procStat(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processUserSeconds(pid: int) -> float | None:
    """utime alone of one process (the part of its CPU spent outside the kernel), or None if gone."""
    fields = _procStat(pid)
    if fields is None:
        return None
    return int(fields[11]) / os.sysconf("SC_CLK_TCK")


def lastCpu(pid: int) -> int | None:
    """The CPU the process last ran on (/proc/PID/stat field 39)."""
    fields = _procStat(pid)
    return int(fields[36]) if fields is not None and len(fields) > 36 else None


def socketCount(pid: int) -> int:
    """How many sockets the process holds open (listening ones included)."""
    count = 0
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in entries:
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def groupCpuSeconds(pgid: int) -> float:
    """
    CPU seconds of the group, reaped children included (cutime/cstime), so a
    forking server's short-lived children are counted once they exit.
    """
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in groupPids(pgid):
        fields = _procStat(pid)
        if fields is not None:
            total += sum(int(v) for v in fields[11:15])
    return total / hz


def foreignCpu(pgid: int) -> dict[int, tuple[str, float]]:
    """
    CPU seconds per user process outside the server's group and this harness
    (whose reaped children include loadgen): what other processes on the machine
    used.  cutime/cstime make a process that started and ended in between
    count through its parent.
    """
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (me, 2):
            continue
        pid = int(entry)
        fields = _procStat(pid)
        if fields is None or int(fields[1]) == 2 or int(fields[2]) == pgid:
            continue  # kernel threads (children of kthreadd), the server under test
        out[pid] = (_procName(pid), sum(int(v) for v in fields[11:15]) / hz)
    return out


def _procName(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def foreignDelta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> tuple[float, list[tuple[str, float]]]:
    """
    Foreign CPU seconds between two snapshots, and the top three by name.

    Summed over both snapshots, not per surviving pid: a process that exits
    in between hands its whole lifetime to its parent's cutime, so its
    earlier share must come off again.
    """
    per: dict[str, float] = {}
    for sign, snap in ((1.0, after), (-1.0, before)):
        for name, secs in snap.values():
            per[name] = per.get(name, 0.0) + sign * secs
    total = max(0.0, sum(per.values()))
    # a name's figure can pass the total (a parent reaping children that ran
    # before the first snapshot): clip it, it only says who was busy
    top = sorted(((n, min(v, total)) for n, v in per.items() if v > 0.005), key=lambda kv: -kv[1])
    return total, top[:3]


def cpuJiffies() -> dict[str, tuple[int, int]]:
    """Per CPU (busy, total) jiffies from /proc/stat; busy excludes idle and iowait."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            nums = [int(v) for v in values[:8]]
            total = sum(nums)
            out[name] = (total - nums[3] - nums[4], total)
    return out


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def groupMemory(pgid: int) -> dict[str, int]:
    """Summed VmRSS and PSS (KiB) and the process count of the group."""
    pids = groupPids(pgid)
    return {
        "rss_kib": sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids),
        "pss_kib": sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids),
        "procs": len(pids),
    }
