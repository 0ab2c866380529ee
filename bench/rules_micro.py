"""
Micro-benchmark: how long one access-rule check takes with a huge rule list.

An operator may feed --allow/--deny a blocklist of 100,000 networks; every
accepted connection pays one AccessRules check, so it must stay a few
microseconds, not grow with the list.  Run directly for a JSON line:

    bench/.venv/bin/python bench/rules_micro.py
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from ipaddress import IPv4Network, IPv6Network, ip_address
from ipaddress import IPv6Address as IPv6Host
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.address import IPv4Address, IPv6Address

from echotw.rules.addresses import parseNetwork
from echotw.rules.policy import AccessRules

SEED = 862  # RFC 862: fixed, so every run checks the same lists
NETWORKS = 100_000
QUERIES = 4000
REPEATS = 9


def randomNetworks(rng: random.Random, count: int) -> list[IPv4Network | IPv6Network]:
    """80 % IPv4 (/16-/32), 20 % IPv6 (/32-/128), host bits cleared."""
    nets: list[IPv4Network | IPv6Network] = []
    for _ in range(count):
        if rng.random() < 0.8:
            prefix = rng.randint(16, 32)
            value = rng.getrandbits(32) >> (32 - prefix) << (32 - prefix)
            nets.append(IPv4Network((value, prefix)))
        else:
            prefix = rng.randint(32, 128)
            value = rng.getrandbits(128) >> (128 - prefix) << (128 - prefix)
            nets.append(IPv6Network((value, prefix)))
    return nets


def queries(rng: random.Random, nets: list[IPv4Network | IPv6Network]) -> list[Any]:
    """Half inside a listed network (hits), half random (mostly misses); IPv4 and IPv6."""
    out: list[Any] = []
    for i in range(QUERIES):
        if i % 2:
            net = rng.choice(nets)
            host = net.network_address + rng.randrange(net.num_addresses)
        else:
            host = ip_address(rng.getrandbits(32)) if i % 4 else IPv6Host(rng.getrandbits(128))
        cls = IPv4Address if host.version == 4 else IPv6Address
        out.append(cls("TCP", str(host), 40000 + i % 1000))
    return out


def timeChecks(rules: AccessRules, addrs: list[Any]) -> tuple[float, int]:
    """Median µs per check over REPEATS passes, and how many were refused."""
    perCheck = []
    refused = 0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        refused = sum(1 for a in addrs if rules(a, "") is not None)
        perCheck.append((time.perf_counter() - t0) / len(addrs) * 1e6)
    return statistics.median(perCheck), refused


def main() -> dict[str, Any]:
    rng = random.Random(SEED)
    nets = randomNetworks(rng, NETWORKS)
    addrs = queries(rng, nets)
    t0 = time.perf_counter()
    big = AccessRules(allow=nets)
    buildS = time.perf_counter() - t0
    bigUs, bigRefused = timeChecks(big, addrs)
    small = AccessRules(allow=[parseNetwork("127.0.0.0/8")])
    smallUs, _ = timeChecks(small, addrs)
    denyUs, _ = timeChecks(AccessRules(deny=nets), addrs)
    return {
        "networks": NETWORKS,
        "queries": len(addrs),
        "repeats": REPEATS,
        "build_s": round(buildS, 3),
        "allow_100k_us": round(bigUs, 3),
        "deny_100k_us": round(denyUs, 3),
        "allow_1_us": round(smallUs, 3),
        "refused_of_queries": bigRefused,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
