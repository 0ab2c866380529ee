"""
instructions.py's results file: user-space instructions per unit of work,
servers across and workloads down (the layout bench/README.md shows), the
ratios to uvloop_proto, the cells that failed and why, and the commands.
"""

from __future__ import annotations

import time
from typing import Any

YARDSTICK = "uvloop_proto"


def markdown(
    results: list[dict[str, Any]],
    peers: list[Any],
    works: list[Any],
    scale: float,
    cmd: str,
    machine: str,
) -> str:
    """The table (servers across, as bench/README.md shows it), then ratios to uvloop."""
    cell = {(r["server"], r["workload"]): r for r in results}

    def figure(peer: Any, work: Any) -> str:
        r = cell.get((peer.name, work.name), {})
        if r.get("mismatches"):
            return "**mismatch**"
        if "per_unit" not in r:
            return "failed" if r else "-"
        flag = f" ({r['errors']} errors)" if r.get("errors") else ""
        text = f"{r['per_unit']:,.0f}{flag}"
        return f"**{text}**" if peer.name.startswith("echotw") else text

    def ratio(peer: Any, work: Any) -> str:
        a = cell.get((peer.name, work.name), {}).get("per_unit")
        b = cell.get((YARDSTICK, work.name), {}).get("per_unit")
        if not (a and b):
            return "-"
        return f"{a / b:.2f}" if a / b >= 0.1 else f"{a / b:.3f}"

    head = "| user-space instructions per unit | " + " | ".join(
        f"**{p.title}**" if p.name.startswith("echotw") else p.title for p in peers
    )
    lines = [
        "# User-space instructions per unit of work (callgrind)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, `{cmd}`",
        "",
        f"On {machine}.",
        "",
        head + " |",
        "|---" * (len(peers) + 1) + "|",
    ]
    lines += [f"| {w.title} | " + " | ".join(figure(p, w) for p in peers) + " |" for w in works]
    lines += ["", f"Ratio to {YARDSTICK} (below 1: fewer instructions than uvloop):", ""]
    lines += ["| workload | " + " | ".join(p.name for p in peers) + " |"]
    lines += ["|---" * (len(peers) + 1) + "|"]
    lines += [f"| {w.name} | " + " | ".join(ratio(p, w) for p in peers) + " |" for w in works]
    done = ", ".join(f"{w.name} {round(w.count * scale):,}" for w in works)
    lines += ["", f"Work counted per cell (round trips, bytes, connections): {done}."]
    failed = [f"- {r['server']} {r['workload']}: {r['fatal']}" for r in results if r.get("fatal")]
    if failed:
        lines += ["", "Failed cells:", "", *failed]
    lines += ["", "Commands:", ""]
    lines += sorted({f"- {r['server']}: `{r['command']}`" for r in results if r.get("command")})
    return "\n".join(lines) + "\n"
