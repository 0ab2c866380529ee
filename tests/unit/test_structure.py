"""
Tests of the package's shape: imports between echotw's modules go one way
(no cycle, counting imports inside functions), modules stay small, and
re-exported names are the very objects they re-export, and each
C{test-case-name} header names test modules that exist.
"""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import echotw
import echotw.proxyprotocol
import echotw.proxyprotocol.endpoint
import echotw.proxyprotocol.factory
import echotw.proxyprotocol.parser
import echotw.proxyprotocol.wrapper
from echotw.config import EchoConfig, Limits
from echotw.options import EchoOptions
from echotw.workers.main import workerConfig

PACKAGE = Path(echotw.__file__).parent
MAX_LINES = 450
"""About 400 lines, with some room; a longer module must say why in its docstring."""


def moduleName(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def echotwImports(path: Path) -> set[str]:
    """
    Every echotw module C{path} imports, anywhere in it (functions and
    C{TYPE_CHECKING} blocks included).
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.startswith("echotw"))
    return found


def importGraph() -> dict[str, set[str]]:
    modules = {moduleName(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # "from echotw import loglevel" names the module echotw.loglevel.
        graph[name] = {m for m in echotwImports(path) if m in modules and m != name}
        if name.startswith("echotw.proxyprotocol."):
            graph[name].discard("echotw.proxyprotocol")
    return graph


def findCycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


class LayeringTests(SynchronousTestCase):
    def test_noImportCycle(self) -> None:
        """No echotw module imports, directly or not, one that imports it."""
        self.assertIsNone(findCycle(importGraph()))

    def test_cycleFinderFindsCycles(self) -> None:
        """The check above can fail: it finds a cycle, even a long one."""
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
        self.assertEqual(findCycle(graph), ["a", "b", "c", "a"])

    def test_lowerLayersDoNotReachUp(self) -> None:
        """The address, parsing and listening helpers import nothing above them."""
        graph = importGraph()
        for low, forbidden in [
            ("echotw.rules.addresses", {"echotw.factory", "echotw.service"}),
            ("echotw.listening", {"echotw.factory", "echotw.service", "echotw.udp"}),
            ("echotw.proxyprotocol.parser", {"echotw.proxyprotocol.wrapper", "echotw.factory"}),
            ("echotw.proxyprotocol.wrapper", {"echotw.factory", "echotw.service"}),
            ("echotw.udp", {"echotw.service", "echotw.factory"}),
            ("echotw.workers.supervisor", {"echotw.tap", "echotw.options", "echotw.build"}),
            ("echotw.protocol", {"echotw.factory", "echotw.service"}),
            ("echotw.reloads", {"echotw.service"}),
            (
                "echotw.counters",
                {"echotw.web.metrics", "echotw.service", "echotw.workers.supervisor"},
            ),
            (
                "echotw.workers.logs",
                {"echotw.workers.supervisor", "echotw.factory", "echotw.build"},
            ),
            ("echotw.workers.main", {"echotw.workers.supervisor", "echotw.workers.process"}),
            ("echotw.shaping", {"echotw.protocol", "echotw.impairment", "echotw.udp"}),
        ]:
            self.assertFalse(graph[low] & forbidden, f"{low} imports {graph[low] & forbidden}")

    def test_selfContainedHelpers(self) -> None:
        """The socket, steering, shared-count and worker-contract helpers import no echotw module."""
        graph = importGraph()
        leaves = (
            "echotw.workers.steering",
            "echotw.workers.reuseport",
            "echotw.workers.sharedcount",
            "echotw.transport.tcpport",
            "echotw.workers.contract",
        )
        for leaf in leaves:
            self.assertEqual(graph[leaf], set(), leaf)

    def test_topLevelIsShort(self) -> None:
        """At most 30 modules sit at echotw's top level: the parts that are
        parts (workers, web, transport, rules, websocket, probe,
        proxyprotocol) are subpackages."""
        top = sorted(path.name for path in PACKAGE.glob("*.py"))
        self.assertLessEqual(len(top), 30, top)

    def test_modulesAreSmall(self) -> None:
        """No module is much over 400 lines unless its docstring says why."""
        for path in PACKAGE.rglob("*.py"):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
                self.assertIn("long because", docstring, f"{path}: {lines} lines")


TEST_CASE_NAME = re.compile(r"^# -\*- test-case-name: (.+) -\*-$")


class TestCaseNameTests(SynchronousTestCase):
    def test_testCaseNamesExist(self) -> None:
        """
        Every C{test-case-name} header (Twisted's first-line convention, which
        C{trial --testmodule} and editors follow to a module's tests) names
        test modules that exist.
        """
        headers = 0
        for path in sorted(PACKAGE.rglob("*.py")):
            first = path.read_text().split("\n", 1)[0]
            match = TEST_CASE_NAME.match(first)
            if match is None:
                self.assertNotIn("test-case-name", first, path)
                continue
            headers += 1
            for name in match.group(1).split(","):
                self.assertTrue(name.startswith("tests."), f"{path}: {name}")
                importlib.import_module(name)
        self.assertGreater(headers, 0)


class ExportTests(SynchronousTestCase):
    def test_proxyProtocolExports(self) -> None:
        """echotw.proxyprotocol re-exports its modules' public names, the same objects."""
        package = echotw.proxyprotocol
        self.assertEqual(len(package.__all__), len(set(package.__all__)))
        for name in package.__all__:
            origins = [
                module
                for module in (
                    echotw.proxyprotocol.parser,
                    echotw.proxyprotocol.wrapper,
                    echotw.proxyprotocol.endpoint,
                    echotw.proxyprotocol.factory,
                )
                if hasattr(module, name)
            ]
            self.assertTrue(origins, name)
            self.assertIs(getattr(package, name), getattr(origins[0], name), name)


class ConfigurationTests(SynchronousTestCase):
    def test_frozen(self) -> None:
        """A configuration cannot be changed in place; variants are copies."""
        config = EchoConfig()
        with self.assertRaises(FrozenInstanceError):
            config.workers = 2  # type: ignore[misc]
        self.assertEqual(replace(config, workers=2).workers, 2)
        self.assertEqual(config.workers, 1)

    def test_optionsProduceConfiguration(self) -> None:
        """The options are turned into one configuration, their values in place."""
        options = EchoOptions()
        options.parseOptions(
            ["--max-per-ip", "3", "--rate", "5/s", "--idle-timeout", "7", "--workers", "2"]
        )
        config = options.config
        self.assertEqual(
            config.limits, replace(Limits(), maxPerSource=3, rate=5.0, idleTimeout=7.0)
        )
        self.assertEqual(config.workers, 2)
        self.assertEqual(
            config.commandLine,
            ("--max-per-ip", "3", "--rate", "5/s", "--idle-timeout", "7", "--workers", "2"),
        )

    def test_optionDefaultsAreTheConfiguration(self) -> None:
        """With no options the configuration is the default one."""
        options = EchoOptions()
        options.parseOptions([])
        config, default = options.config, EchoConfig()
        for part in ("listeners", "limits", "udp", "proxy", "logging", "impairment", "workers"):
            self.assertEqual(getattr(config, part), getattr(default, part), part)
        self.assertEqual(config.shutdownTimeout, default.shutdownTimeout)

    def test_workerConfig(self) -> None:
        """A worker serves no UDP and no metrics endpoint, runs alone, and keeps
        the whole server's limits; the supervisor's configuration is unchanged."""
        options = EchoOptions()
        options.parseOptions(
            "--workers 3 --max-connections 10 --udp 7 --max-per-ip 2 --metrics tcp:0".split()
        )
        supervisor = options.config
        worker = workerConfig(supervisor)
        self.assertEqual((worker.workers, worker.udpListeners, worker.metrics), (1, (), None))
        self.assertEqual(worker.limits, supervisor.limits)
        self.assertEqual(supervisor.workers, 3)
        self.assertEqual(len(supervisor.udpListeners), 1)
        self.assertEqual(supervisor.metrics, "tcp:0")

    def test_workersShareTheConnectionLog(self) -> None:
        """The workers together log no more connections a second than
        --log-connections says; each logs at least one; 0 stays 0 (all)."""
        for workers, limit in [(3, 100), (4, 2), (2, 1), (8, 1000), (5, 0)]:
            options = EchoOptions()
            options.parseOptions(["--workers", str(workers), "--log-connections", str(limit)])
            shares = [
                workerConfig(options.config, i).logging.connectionsPerSecond for i in range(workers)
            ]
            if limit == 0:
                self.assertEqual(shares, [0] * workers)
                continue
            self.assertEqual(sum(shares), max(limit, workers), (workers, limit))
            self.assertLessEqual(max(shares) - min(shares), 1)
            self.assertGreaterEqual(min(shares), 1)

    def test_workersShareTheRefusalCap(self) -> None:
        """The cap on refusal lines holds for the whole server: the workers'
        shares add up to it (each at least one)."""
        for workers in (1, 2, 3, 7, 64):
            options = EchoOptions()
            options.parseOptions(["--workers", str(workers)])
            total = options.config.logging.refusalsPerSecond
            shares = [
                workerConfig(options.config, i).logging.refusalsPerSecond for i in range(workers)
            ]
            self.assertEqual(sum(shares), max(total, workers))
            self.assertGreaterEqual(min(shares), 1)
