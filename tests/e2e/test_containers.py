"""
The container image (C{Dockerfile}) and the Kubernetes manifests
(C{deploy/kubernetes/}): linted and validated by the tools of the C{ci}
extra (a test whose tool is missing skips and names it), and checked
against each other and against echotw's own options, so that a port, a
user or a shutdown delay changed in one place and not the others fails
(the manifests among themselves: L{tests.unit.test_manifests}).

The image itself is not built here: its base image lives on a registry
this machine cannot reach.
"""

from __future__ import annotations

import copy
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

from echotw.tap import Options
from tests.support.process import ROOT, ServerTestCase, freePort

DOCKERFILE = ROOT / "Dockerfile"
MANIFESTS = ROOT / "deploy" / "kubernetes"
CORE_MANIFESTS = [MANIFESTS / "deployment.yaml", MANIFESTS / "service.yaml"]
PODMONITOR = MANIFESTS / "podmonitor.yaml"


def tool(name: str) -> str:
    """
    The path of command-line tool C{name}, from this virtualenv (where the
    C{ci} extra installs it) or C{PATH}; skip the test if it is missing.
    """
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        raise SkipTest(f"{name} is not installed (pip install -e '.[ci]')")
    return path


def loadYAML(text: str) -> list[dict[str, Any]]:
    try:
        import yaml
    except ImportError:
        raise SkipTest("PyYAML is not installed (pip install -e '.[test]')") from None
    return [document for document in yaml.safe_load_all(text) if document]


def manifest(kind: str) -> dict[str, Any]:
    """
    The one object of C{kind} under C{deploy/kubernetes/}.
    """
    [found] = [
        document
        for path in sorted(MANIFESTS.glob("*.yaml"))
        for document in loadYAML(path.read_text())
        if document["kind"] == kind
    ]
    return found


def optionValues(args: list[str], option: str) -> list[str]:
    """
    The values given to C{--option} in C{args} (C{--option VALUE} or
    C{--option=VALUE}).
    """
    values = []
    for i, arg in enumerate(args):
        if arg == option:
            values.append(args[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg.split("=", 1)[1])
    return values


def endpointPort(description: str) -> int:
    """
    The port of a listener as echotw's options take it: a bare number, or a
    Twisted endpoint string such as C{tcp:9100:interface=0.0.0.0}.
    """
    if description.isdigit():
        return int(description)
    return int(description.split(":")[1])


def listeners(args: list[str]) -> set[tuple[int, str]]:
    """
    The C{(port, protocol)} pairs that C{twistd echo ARGS} listens on.
    """
    return (
        {(endpointPort(value), "TCP") for value in optionValues(args, "--port")}
        | {(endpointPort(value), "UDP") for value in optionValues(args, "--udp")}
        | {(endpointPort(value), "TCP") for value in optionValues(args, "--metrics")}
    )


class Dockerfile:
    """
    The instructions of a Dockerfile: continuation lines joined, comments
    and blank lines dropped, each as C{(INSTRUCTION, arguments)}.
    """

    def __init__(self, text: str) -> None:
        joined = re.sub(r"\\\n", " ", re.sub(r"(?m)^\s*#.*\n", "", text))
        self.instructions = [
            (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines()
            if line.strip()
        ]

    def all(self, instruction: str) -> list[str]:
        return [arguments for name, arguments in self.instructions if name == instruction]

    def one(self, instruction: str) -> str:
        [arguments] = self.all(instruction)
        return arguments

    def execForm(self, instruction: str) -> list[str]:
        """
        The JSON array of an exec-form C{instruction} (ENTRYPOINT, CMD, or
        HEALTHCHECK's CMD after its options).
        """
        arguments = self.one(instruction)
        return list(json.loads(arguments[arguments.index("[") :]))


def dockerfile() -> Dockerfile:
    return Dockerfile(DOCKERFILE.read_text())


class HealthServer:
    """
    A small HTTP server on loopback answering C{GET /healthz} with a status
    chosen by the test (and 404 elsewhere), standing in for echotw's.
    """

    def __init__(self, status: int) -> None:
        self.paths: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.paths.append(self.path)
                self.send_response(status if self.path == "/healthz" else 404)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def healthCheck(port: int) -> subprocess.CompletedProcess[str]:
    """
    Run the Dockerfile's HEALTHCHECK command here (this interpreter for the
    image's C{python}), aimed at loopback port C{port} instead of 9100.
    """
    command = dockerfile().execForm("HEALTHCHECK")
    assert command[0] == "python", command
    script = command[-1]
    assert script.count("127.0.0.1:9100") == 1, script
    command = [sys.executable, *command[1:-1], script.replace("9100", str(port))]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


class DockerfileTests(SynchronousTestCase):
    def hadolint(self, text: str) -> subprocess.CompletedProcess[str]:
        """
        Lint C{text} as a Dockerfile, failing on findings of every level.
        """
        return subprocess.run(
            [tool("hadolint"), "--no-color", "--failure-threshold", "style", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def test_hadolint(self) -> None:
        """hadolint finds nothing to say about the Dockerfile, at any level."""
        result = self.hadolint(DOCKERFILE.read_text())
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_hadolintFails(self) -> None:
        """The lint can fail: an unpinned base image and a pip cache are
        caught."""
        text = DOCKERFILE.read_text()
        broken = re.sub(r"(?m)^FROM python:\S+", "FROM python:latest", text, count=1)
        broken = broken.replace("pip install --no-cache-dir", "pip install")
        self.assertNotEqual(broken, text)
        result = self.hadolint(broken)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("DL3007", result.stdout)
        self.assertIn("DL3042", result.stdout)

    def test_twoStages(self) -> None:
        """The wheel is built in a first stage; the image is a second stage
        of the same slim base that installs those wheels and nothing from
        an index."""
        froms = dockerfile().all("FROM")
        self.assertEqual(len(froms), 2, froms)
        self.assertRegex(froms[0], r"^python:\S+-slim AS build$")
        self.assertEqual(froms[1], froms[0].split()[0])
        [install] = [
            run for run in dockerfile().all("RUN") if "pip install" in run and "from=build" in run
        ]
        self.assertIn("--no-index", install)

    def test_imageHasTLS(self) -> None:
        """ssl: listeners and echotw-probe --tls work in the image: the
        build stage makes the wheels of the tls extra too, and the image
        installs echotw with that extra, from those wheels alone."""
        runs = dockerfile().all("RUN")
        [wheels] = [run for run in runs if "pip wheel" in run]
        self.assertRegex(wheels, r"--wheel-dir /wheels '\.\[tls\]'$")
        [install] = [run for run in runs if "pip install" in run and "from=build" in run]
        self.assertRegex(install, r"--no-index --find-links=/wheels 'echotw\[tls\]' ")
        self.assertRegex(
            (ROOT / "pyproject.toml").read_text(), r'(?m)^tls = \[\n    "twisted\[tls\]>='
        )

    def test_nonRootUser(self) -> None:
        """The image runs as a numeric, non-root user (so runAsNonRoot can
        check it), the one the Deployment names."""
        user, group = dockerfile().one("USER").split(":")
        self.assertGreater(int(user), 0)
        self.assertGreater(int(group), 0)
        podSecurity = manifest("Deployment")["spec"]["template"]["spec"]["securityContext"]
        self.assertEqual(
            (podSecurity["runAsUser"], podSecurity["runAsGroup"]), (int(user), int(group))
        )

    def test_entryPoint(self) -> None:
        """twistd runs echo in the foreground without a pidfile; the default
        arguments are echotw options it accepts."""
        self.assertEqual(
            dockerfile().execForm("ENTRYPOINT"), ["twistd", "--nodaemon", "--pidfile=", "echo"]
        )
        Options().parseOptions(dockerfile().execForm("CMD"))

    def test_exposedPorts(self) -> None:
        """EXPOSE names exactly what the default arguments listen on: TCP
        and UDP echo and the metrics port."""
        exposed = set()
        for arguments in dockerfile().all("EXPOSE"):
            for port in arguments.split():
                number, _, protocol = port.partition("/")
                exposed.add((int(number), (protocol or "tcp").upper()))
        self.assertEqual(exposed, listeners(dockerfile().execForm("CMD")))
        self.assertEqual({protocol for _, protocol in exposed}, {"TCP", "UDP"})

    def test_healthCheckAsksMetricsPort(self) -> None:
        """The health check asks /healthz on the port the default arguments
        give --metrics."""
        [metrics] = optionValues(dockerfile().execForm("CMD"), "--metrics")
        self.assertIn(
            f"http://127.0.0.1:{endpointPort(metrics)}/healthz",
            dockerfile().execForm("HEALTHCHECK")[-1],
        )

    def test_healthCheckHealthy(self) -> None:
        """The health check succeeds when /healthz answers 200."""
        server = HealthServer(200)
        self.addCleanup(server.close)
        result = healthCheck(server.port)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(server.paths, ["/healthz"])

    def test_healthCheckUnhealthy(self) -> None:
        """The health check fails when /healthz answers an error, and when
        nothing listens."""
        server = HealthServer(503)
        self.addCleanup(server.close)
        self.assertNotEqual(healthCheck(server.port).returncode, 0)
        self.assertEqual(server.paths, ["/healthz"])
        self.assertNotEqual(healthCheck(freePort()).returncode, 0)

    def test_buildContext(self) -> None:
        """.dockerignore leaves everything out of the build context but what
        the Dockerfile copies (no virtualenv, .git or caches sent)."""
        patterns = [
            line.strip()
            for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        self.assertEqual(patterns[0], "*")
        kept = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
        copied = set()
        for arguments in dockerfile().all("COPY"):
            if not arguments.startswith("--from"):
                copied.update(source.rstrip("/") for source in arguments.split()[:-1])
        self.assertEqual(kept, copied)
        for path in copied:
            self.assertTrue((ROOT / path).exists(), path)


class DockerHealthCheckServerTests(ServerTestCase):
    def test_healthCheckAgainstServer(self) -> None:
        """The Dockerfile's health check passes against a real twistd echo
        serving metrics on the port it asks."""
        port = freePort()
        self.start(
            "--port", "tcp:0:interface=127.0.0.1", "--metrics", f"tcp:{port}:interface=127.0.0.1"
        )
        deadline = time.monotonic() + 20
        while (result := healthCheck(port)).returncode != 0:
            self.assertLess(time.monotonic(), deadline, result.stderr)
            time.sleep(0.1)


def podMonitorModel() -> Any:
    """
    The Prometheus Operator's PodMonitor as a typed model, generated from its
    resource definition by the C{cloudcoil.models.prometheus_operator}
    package; skip the test if that is not installed.
    """
    try:
        from cloudcoil.models.prometheus_operator.v1 import PodMonitor
    except ImportError:
        raise SkipTest(
            "cloudcoil.models.prometheus_operator is not installed (pip install -e '.[ci]')"
        ) from None
    return PodMonitor


def validatePodMonitor(model: Any, document: dict[str, Any]) -> None:
    """
    Validate a PodMonitor against L{podMonitorModel}: types, patterns,
    enumerations and required fields; and, what the model would silently
    drop, any field the definition does not have.  Raises C{ValueError}.
    """
    from pydantic import ValidationError

    try:
        validated = model.model_validate(document, strict=True)
    except ValidationError as e:
        raise ValueError(str(e)) from None
    known = validated.model_dump(mode="json", by_alias=True, exclude_unset=True)
    unknown = unknownFields(document, known)
    if unknown:
        raise ValueError(f"fields the PodMonitor definition does not have: {unknown}")


def unknownFields(given: Any, known: Any, path: str = "") -> list[str]:
    """
    The paths of the fields in C{given} that are missing from C{known} (the
    same document after a round trip through a model that drops unknown
    fields).
    """
    if isinstance(given, dict) and isinstance(known, dict):
        missing = []
        for key, value in given.items():
            if key not in known:
                missing.append(f"{path}.{key}".lstrip("."))
            else:
                missing += unknownFields(value, known[key], f"{path}.{key}")
        return missing
    if isinstance(given, list) and isinstance(known, list):
        return [
            field
            for i, (item, kept) in enumerate(zip(given, known, strict=True))
            for field in unknownFields(item, kept, f"{path}[{i}]")
        ]
    return []


class KubernetesTests(SynchronousTestCase):
    def kubernetesValidate(self, *paths: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("kubernetes-validate"), "--strict", *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def test_kubernetesValidate(self) -> None:
        """kubernetes-validate --strict accepts the Deployment and the
        Service, each checked against a schema (no unknown kind passes with
        a mere warning)."""
        result = self.kubernetesValidate(*CORE_MANIFESTS)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        self.assertEqual(len(re.findall(r"(?m)^INFO .* passed for resource", output)), 2, output)
        self.assertNotRegex(output, r"(?m)^(WARN|ERROR|FATAL)")

    def test_kubernetesValidateFails(self) -> None:
        """The validation can fail: a misspelt field and a number given as a
        string are both refused."""
        text = (MANIFESTS / "deployment.yaml").read_text()
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, True)
        for broken in [
            text.replace("readinessProbe:", "readinesProbe:"),
            text.replace("runAsUser: 10001", 'runAsUser: "10001"'),
        ]:
            self.assertNotEqual(broken, text)
            path = directory / "deployment.yaml"
            path.write_text(broken)
            result = self.kubernetesValidate(path)
            self.assertEqual(result.returncode, 1, result.stdout)
            self.assertRegex(result.stdout, r"(?m)^ERROR .* did not validate")

    def test_everyObjectValidated(self) -> None:
        """The directory holds exactly the objects these tests validate."""
        kinds = sorted(
            (path.name, document["kind"])
            for path in MANIFESTS.glob("*.yaml")
            for document in loadYAML(path.read_text())
        )
        self.assertEqual(
            kinds,
            [
                ("deployment.yaml", "Deployment"),
                ("podmonitor.yaml", "PodMonitor"),
                ("service.yaml", "Service"),
            ],
        )

    def test_podMonitorValid(self) -> None:
        """The PodMonitor matches the Prometheus Operator's definition of
        one, with no field it lacks."""
        [document] = loadYAML(PODMONITOR.read_text())
        self.assertEqual(document["apiVersion"], "monitoring.coreos.com/v1")
        validatePodMonitor(podMonitorModel(), document)

    def test_podMonitorValidationFails(self) -> None:
        """The PodMonitor check can fail: a misspelt field, a malformed
        interval and a missing selector are each refused."""
        model = podMonitorModel()
        [document] = loadYAML(PODMONITOR.read_text())
        misspelt = copy.deepcopy(document)
        endpoint = misspelt["spec"]["podMetricsEndpoints"][0]
        endpoint["scrapeInterval"] = endpoint.pop("interval")
        badInterval = copy.deepcopy(document)
        badInterval["spec"]["podMetricsEndpoints"][0]["interval"] = "30 seconds"
        noSelector = copy.deepcopy(document)
        del noSelector["spec"]["selector"]
        for broken, message in [
            (misspelt, "spec.podMetricsEndpoints[0].scrapeInterval"),
            (badInterval, "interval"),
            (noSelector, "selector"),
        ]:
            with self.assertRaises(ValueError) as raised:
                validatePodMonitor(model, broken)
            self.assertIn(message, str(raised.exception))
