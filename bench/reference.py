"""
Optional cross-check against an independent benchmark harness (run.py
--reference DIR), which is not part of this repository.

The benchmark is only worth its ratios if loadgen is not what is measured.
So, in the same run, the harness in DIR (its own C client and its own uvloop
peer, answering `DIR/run.py --only uvloop_proto --workloads ... --out PREFIX`
with JSON lines) measures uvloop_proto on the same workloads, and the results
file shows our figure next to its figure.  It is run, never copied: it needs
its own `DIR/setup.sh` once per machine.

The two sides take turns (ours, reference, ours, reference, ...) rather than
one long run each: other processes on a shared machine come and go, and
their load would otherwise fall on one side only.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workloads import Workload, value

AGREEMENT_PCT = 10.0
Results = list[dict[str, Any]]


def _refValue(r: dict[str, Any]) -> float | None:
    """The reference's headline figure, in the same units as ours."""
    if r.get("fatal"):
        return None
    if r.get("mode") == "hold":
        return r.get("kib_per_conn")
    return {"pingpong": r.get("roundtrips_per_s"), "churn": r.get("conns_per_s")}.get(
        r.get("mode", ""), r.get("mb_per_s")
    )


def _referenceOnce(wls: list[Workload], args: Any, scratch: Path) -> Results | str:
    """One round of the reference harness for uvloop_proto: its JSON lines, or an error."""
    cmd = [sys.executable, str(Path(args.reference) / "run.py"), "--only", "uvloop_proto"]
    cmd += ["--workloads", ",".join(w.name for w in wls), "--rounds", "1"]
    cmd += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    cmd += ["--out", str(scratch / "ref")]
    cmd += ["--block-client"] if args.block_client else []
    limit = len(wls) * (args.seconds + args.warmup + 90) + 60
    print(f"== reference: {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=limit, cwd=args.reference
        )
    except subprocess.TimeoutExpired:
        return f"reference harness did not finish in {limit:g} s"
    jsonl = scratch / "ref.jsonl"
    if not jsonl.exists():
        return f"reference wrote no results (status {proc.returncode}): {proc.stderr[-300:]}"
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def interleaved(
    wls: list[Workload], args: Any, prefix: Path, runOurs: Callable[[], Results]
) -> dict[str, Any]:
    """
    Alternate our uvloop_proto run and the reference's, --reference-rounds
    times; save both sides' raw lines next to the results file.
    """
    if not (Path(args.reference) / ".venv" / "bin" / "python").exists():
        return {"error": f"the reference harness is not set up: run {args.reference}/setup.sh"}
    ours: Results = []
    theirs: Results = []
    for rnd in range(args.reference_rounds):
        ours += [dict(r, round=rnd) for r in runOurs()]
        with tempfile.TemporaryDirectory(prefix="echotw-ref-") as tmp:
            got = _referenceOnce(wls, args, Path(tmp))
        if isinstance(got, str):
            return {"error": got}
        theirs += [dict(r, round=rnd) for r in got]
    for suffix, rows in (("ours", ours), ("reference", theirs)):
        with open(f"{prefix}-check-{suffix}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"ours": ours, "theirs": theirs}


def comparison(check: dict[str, Any], wls: list[Workload], args: Any) -> list[str]:
    """The results-file section: our uvloop_proto figure vs the reference's."""
    lines = [
        "## Reference check: loadgen vs the reference harness, uvloop_proto",
        "",
        f"The reference is {args.reference}/run.py with its own C client and its own uvloop "
        "peer. Same workloads, seconds and warm-up; the two sides took turns "
        f"({args.reference_rounds} rounds each), right after the main run. Agreement, "
        f"within {AGREEMENT_PCT:g} %, is judged on each side's best round (load from other "
        "processes only ever lowers a figure); medians are shown too. "
        "Other: the most CPU other processes used during one of the cells, % of a CPU "
        "(ours / reference).",
        "",
    ]
    if "error" in check:
        return [*lines, f"FAIL: {check['error']}"]
    lines += [
        f"| workload | ours (best) | reference (best) | difference | within {AGREEMENT_PCT:g} % "
        "| ours / reference (median) | other |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in wls:
        mine = [r for r in check["ours"] if r.get("workload") == w.name]
        refs = [r for r in check["theirs"] if r.get("workload") == w.name]
        low = w.mode == "hold"  # KiB per connection: lower is better
        a, b = _best([value(r) for r in mine], low), _best([_refValue(r) for r in refs], low)
        medians = (
            f"{_fmt(_median([value(r) for r in mine]))} / "
            f"{_fmt(_median([_refValue(r) for r in refs]))}"
        )
        noise = (
            f"{max((r.get('other_cpu_pct') or 0 for r in mine), default=0):.0f} / "
            f"{max((r.get('noise_cpu_pct') or 0 for r in refs), default=0):.0f}"
        )
        if a is None or b is None:
            lines.append(
                f"| {w.name} | {_fmt(a)} | {_fmt(b)} | - | no figure | {medians} | {noise} |"
            )
            continue
        diff = 100 * (a - b) / b
        ok = "yes" if abs(diff) <= AGREEMENT_PCT else "**no**"
        lines.append(
            f"| {w.name} | {a:,.2f} | {b:,.2f} | {diff:+.1f} % | {ok} | {medians} | {noise} |"
        )
    return lines


def _best(vals: list[float | None], lowerIsBetter: bool) -> float | None:
    """The least disturbed round: noise from other processes only ever makes a run worse."""
    real = [v for v in vals if v is not None]
    if not real:
        return None
    return min(real) if lowerIsBetter else max(real)


def _median(vals: list[float | None]) -> float | None:
    real = [v for v in vals if v is not None]
    return statistics.median_low(real) if real else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f}"
