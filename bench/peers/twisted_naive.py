"""
The textbook Twisted echo server: the baseline echotw is measured against.

Usage: twisted_naive.py PORT   (listens on 127.0.0.1, default epoll reactor)

Deliberately the version from the Twisted docs, with nothing tuned: it shows
what a user gets without echotw.
"""

import sys

from twisted.internet import protocol, reactor


class Echo(protocol.Protocol):
    """Writes back whatever arrives."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


def main(port: int) -> None:
    """Listen on loopback only: the benchmark never exposes a server."""
    factory = protocol.Factory.forProtocol(Echo)
    reactor.listenTCP(port, factory, backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
