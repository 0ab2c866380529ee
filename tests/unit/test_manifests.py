"""
Unit tests that the Kubernetes manifests agree with echotw: the options
the container is given, its ports and probes, and what the PodMonitor
scrapes.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from echotw.tap import Options
from tests import ROOT
from tests.e2e.test_containers import endpointPort, listeners, manifest, optionValues


class ManifestConsistencyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.deployment = manifest("Deployment")
        self.pod = self.deployment["spec"]["template"]
        [self.container] = self.pod["spec"]["containers"]
        self.args = self.container["args"]
        self.ports = {port["name"]: port for port in self.container["ports"]}

    def assertSelects(self, selector: dict[str, str]) -> None:
        self.assertTrue(selector)
        labels = self.pod["metadata"]["labels"]
        self.assertEqual({key: labels.get(key) for key in selector}, selector)

    def test_argsAccepted(self) -> None:
        """echotw accepts the container's arguments."""
        Options().parseOptions(self.args)

    def test_gracePeriod(self) -> None:
        """Drain delay plus shutdown timeout end before the kubelet's
        SIGKILL, with time to spare for the process to exit."""
        [delay] = optionValues(self.args, "--drain-delay")
        [timeout] = optionValues(self.args, "--shutdown-timeout")
        grace = self.pod["spec"]["terminationGracePeriodSeconds"]
        self.assertGreater(float(delay), 0)
        self.assertLessEqual(float(delay) + float(timeout) + 2, grace)

    def test_containerPorts(self) -> None:
        """The container declares exactly what echotw listens on: TCP and
        UDP echo and the metrics port, named."""
        declared = {(port["containerPort"], port["protocol"]) for port in self.ports.values()}
        self.assertEqual(declared, listeners(self.args))
        [metrics] = optionValues(self.args, "--metrics")
        self.assertEqual(self.ports["metrics"]["containerPort"], endpointPort(metrics))
        self.assertEqual(
            {self.ports["echo-tcp"]["protocol"], self.ports["echo-udp"]["protocol"]}, {"TCP", "UDP"}
        )

    def test_probes(self) -> None:
        """Readiness asks /readyz and liveness /healthz, on the metrics
        port; readiness reacts within seconds of a SIGTERM."""
        readiness = self.container["readinessProbe"]
        liveness = self.container["livenessProbe"]
        self.assertEqual(readiness["httpGet"], {"path": "/readyz", "port": "metrics"})
        self.assertEqual(liveness["httpGet"], {"path": "/healthz", "port": "metrics"})
        [delay] = optionValues(self.args, "--drain-delay")
        detection = readiness["periodSeconds"] * readiness.get("failureThreshold", 3)
        self.assertLess(detection, float(delay))

    def test_hardened(self) -> None:
        """Non-root, no privilege escalation, a read-only root filesystem,
        no capabilities, resource requests and limits."""
        self.assertTrue(self.pod["spec"]["securityContext"]["runAsNonRoot"])
        security = self.container["securityContext"]
        self.assertIs(security["allowPrivilegeEscalation"], False)
        self.assertIs(security["readOnlyRootFilesystem"], True)
        self.assertEqual(security["capabilities"], {"drop": ["ALL"]})
        for kind in ("requests", "limits"):
            self.assertEqual(set(self.container["resources"][kind]), {"cpu", "memory"})

    def test_imageVersion(self) -> None:
        """The image tag is the package version pyproject.toml declares."""
        version = re.search(r'(?m)^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text())
        assert version is not None
        self.assertEqual(self.container["image"], f"echotw:{version[1]}")

    def test_deploymentSelector(self) -> None:
        """The Deployment's selector matches its own pods."""
        self.assertSelects(self.deployment["spec"]["selector"]["matchLabels"])

    def test_service(self) -> None:
        """The Service selects the pods and sends TCP and UDP echo and the
        metrics port to the container ports of the same protocol."""
        service = manifest("Service")
        self.assertSelects(service["spec"]["selector"])
        protocols = set()
        for port in service["spec"]["ports"]:
            target = self.ports[port["targetPort"]]
            self.assertEqual(port["protocol"], target["protocol"], port)
            protocols.add((port["name"], port["protocol"]))
        self.assertEqual(protocols, {("echo-tcp", "TCP"), ("echo-udp", "UDP"), ("metrics", "TCP")})

    def test_podMonitor(self) -> None:
        """The PodMonitor selects the pods and scrapes /metrics on the
        metrics port."""
        monitor = manifest("PodMonitor")
        self.assertSelects(monitor["spec"]["selector"]["matchLabels"])
        [endpoint] = monitor["spec"]["podMetricsEndpoints"]
        self.assertEqual((endpoint["port"], endpoint["path"]), ("metrics", "/metrics"))
        self.assertIn(endpoint["port"], self.ports)
