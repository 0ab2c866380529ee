# -*- test-case-name: tests.unit.test_health -*-
"""
Health and readiness over HTTP, for Kubernetes probes and balancers:
C{GET /healthz} answers 200 while the process runs its event loop (an
answer at all proves it), C{GET /readyz} answers 200 while the server
accepts connections and 503 from the moment a shutdown begins.

Both are served next to C{/metrics} on the C{--metrics} listener, or on a
listener of their own with C{--health ENDPOINT}.  Either keeps serving
through the whole drain (C{servesThroughDrain}): the kubelet must not kill
a pod that is finishing its connections, while its Service stops sending it
new ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from echotw.endpoints import withBacklog
from echotw.listening import watchAcceptErrors
from echotw.rules.addresses import describeAddress, formatAddress
from echotw.service import ListenerService
from echotw.web.guard import GuardedSite, deferAccepts


class Page(Resource):
    """
    A leaf that answers GET, and HEAD with GET's headers and no body
    (twisted.web would otherwise log a warning for every HEAD request it
    answers with a body: a log line any peer could repeat at will).
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        raise NotImplementedError

    def render_HEAD(self, request: Request) -> bytes:
        body = self.render_GET(request)
        request.setHeader(b"content-length", b"%d" % (len(body),))
        return b""


class NotFound(Page):
    """
    A plain 404.
    """

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(http.NOT_FOUND)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found\n"


class HealthResource(Page):
    """
    C{/healthz}: 200 whenever it can answer.
    """

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class ReadyResource(Page):
    """
    C{/readyz}: 200 while C{ready()} says so, else 503.
    """

    def __init__(self, ready: Callable[[], bool]) -> None:
        super().__init__()
        self.ready = ready

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.ready():
            return b"ready\n"
        request.setResponseCode(http.SERVICE_UNAVAILABLE)
        return b"shutting down\n"


class Root(Resource):
    """
    A site's root: only its named children; a plain 404 for anything else.
    """

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return NotFound()


def addHealth(root: Resource, ready: Callable[[], bool]) -> None:
    """
    Put C{/healthz} and C{/readyz} on C{root}.
    """
    root.putChild(b"healthz", HealthResource())
    root.putChild(b"readyz", ReadyResource(ready))


class WebService(ListenerService):
    """
    A small HTTP listener of echotw's own (metrics, health): it listens like
    the echo listeners (in C{privilegedStartService}, one-line exit if it
    cannot), logs what it serves where, and stops only after the drain.
    Its site guards it (L{echotw.web.guard}), and when C{accept} fails, for
    lack of file descriptors say, the port's log lines are counted and
    throttled as the echo listeners' are (L{watchAcceptErrors}).  A TCP
    endpoint without its own C{backlog=} gets the echo listeners' default
    (C{SOMAXCONN}): with Twisted's 50, a flood of connections fills the
    listen queue and the kernel drops a probe's SYN, which the client
    sends again only after a second, past the probe's timeout.  Its
    connections reach C{accept} once they have sent something
    (L{deferAccepts}).
    """

    servesThroughDrain = True
    what = "health checks"
    event = "health-listening"

    def __init__(
        self, description: str, site: GuardedSite, reactor: IReactorCore | None = None
    ) -> None:
        if reactor is None:
            reactor = defaultReactor()
        endpoint = serverFromString(reactor, withBacklog(description))
        self.site = site
        # Site's Factory parameter is typed loosely in Twisted's stubs.
        super().__init__(description, endpoint, site)  # type: ignore[arg-type]

    def _listening(self, port: Any) -> Any:
        if isinstance(port, Failure):
            return super()._listening(port)
        self.port = port
        site = self.site
        deferAccepts(port)
        self._acceptErrors = watchAcceptErrors(
            port, self.description, site.reactor, site.throttle, site.countRejected
        )
        address = port.getHost()
        host, portNumber = describeAddress(address)
        self._log.info(
            "Serving {what} on {listener} at {address}",
            event=self.event,
            what=self.what,
            listener=self.description,
            address=formatAddress(address),
            host=host,
            port=portNumber,
        )
        return port


class HealthService(WebService):
    """
    C{--health ENDPOINT}: C{/healthz} and C{/readyz} alone.
    """

    def __init__(
        self, description: str, ready: Callable[[], bool], reactor: IReactorCore | None = None
    ) -> None:
        root = Root()
        addHealth(root, ready)
        reactor = reactor or defaultReactor()
        super().__init__(description, GuardedSite(root, "health", description, reactor), reactor)


def defaultReactor() -> IReactorCore:
    """
    The global reactor, for a service given none.
    """
    from twisted.internet import reactor

    return cast(IReactorCore, reactor)
