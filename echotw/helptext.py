"""
C{twistd echo --help} in groups, one line per option where it fits:
Twisted's own help lists every option alphabetically, with floats as
C{10.0}, empty defaults as C{[default: ]} and each coerce function's
sentence appended, which made 100 lines nobody scans.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from twisted.python import usage

from echotw.coercers import numberText
from echotw.version import __version__

Group = tuple[str, Sequence[tuple[str, str]]]
"""A heading and its options, each C{(long name, metavar)} (C{""} for a flag)."""


HELP_GROUPS: list[Group] = [
    (
        f"Listeners (echotw {__version__})",
        [
            ("port", "ENDPOINT"),
            ("udp", "LISTENER"),
            ("websocket", "ENDPOINT"),
            ("interface", "ADDR"),
            ("backlog", "N"),
            ("workers", "N"),
            ("worker-timeout", "S"),
            ("native", "MODE"),
        ],
    ),
    (
        "Who may connect",
        [
            ("allow", "CIDR"),
            ("deny", "CIDR"),
            ("allow-file", "PATH"),
            ("deny-file", "PATH"),
            ("verifier", "MODULE:NAME"),
            ("trusted-proxy", "CIDR"),
            ("proxy-timeout", "S"),
        ],
    ),
    (
        "Limits",
        [
            ("max-connections", "N"),
            ("max-per-ip", "N"),
            ("rate", "N[/s]"),
            ("burst", "N"),
            ("ipv6-prefix", "BITS"),
            ("idle-timeout", "S"),
            ("max-session-bytes", "N"),
            ("max-session-seconds", "S"),
            ("udp-rate", "N[/s]"),
            ("udp-burst", "N"),
            ("ws-max-message", "BYTES"),
        ],
    ),
    ("Shutdown", [("shutdown-timeout", "S"), ("drain-delay", "S")]),
    (
        "Logs and metrics",
        [
            ("log-level", "LEVEL"),
            ("log-connections", "N"),
            ("stats-interval", "S"),
            ("metrics", "ENDPOINT"),
            ("health", "ENDPOINT"),
        ],
    ),
    (
        "Impairment (testing a path or a client; all off by default)",
        [("delay", "S"), ("jitter", "S"), ("bandwidth", "RATE"), ("udp-loss", "SHARE")],
    ),
    ("Other", [("help", ""), ("version", "")]),
]
"""The option groups of C{--help}, in the order a reader looks for them."""


def formatDefault(value: object) -> str | None:
    """
    A default as people write it (C{10}, not C{10.0}); L{None} for none.
    """
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, float):
        return numberText(value)
    return str(value)


def groupedUsage(options: usage.Options, groups: Sequence[Group], width: int = 80) -> str:
    """
    The options of C{options} under the headings of C{groups}: each with
    its short name, metavar, help text and default.

    @raise ValueError: if an option is in no group, or a group names one
        that does not exist (a test keeps the two in step).
    """
    longToShort = {
        name: short for short, name in options.synonyms.items() if short != name and len(short) == 1
    }
    known = {opt.rstrip("=") for opt in options.longOpt}
    grouped = [name for _, members in groups for name, _ in members]
    if set(grouped) != known or len(grouped) != len(set(grouped)):
        raise ValueError(f"help groups do not match the options: {sorted(set(grouped) ^ known)}")
    labels = {}
    for _, members in groups:
        for name, metavar in members:
            short = longToShort.get(name)
            label = (f"-{short}, " if short else "    ") + f"--{name}"
            labels[name] = f"{label} {metavar}" if metavar else label
    column = min(max(len(label) for label in labels.values()) + 4, 32)
    lines = []
    for heading, members in groups:
        lines.append(f"{heading}:")
        for name, _ in members:
            doc = " ".join((options.docs.get(name) or "").split())
            default = formatDefault(options.defaults.get(name))
            if default is not None and "[default:" not in doc:
                doc = f"{doc.removesuffix('.')} [default: {default}]."
            label = f"  {labels[name]}"
            wrapped = textwrap.wrap(doc, max(width - column, 20)) or [""]
            if len(label) + 2 > column:
                lines.append(label)
                lines.extend(" " * column + part for part in wrapped)
            else:
                lines.append(label.ljust(column) + wrapped[0])
                lines.extend(" " * column + part for part in wrapped[1:])
        lines.append("")
    return "\n".join(lines)
