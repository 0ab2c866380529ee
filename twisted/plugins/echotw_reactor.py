from twisted.application.reactors import Reactor

echotw = Reactor(
    "echotw",
    "echotw.transport.reactor",
    "epoll, without the per-event log context for echo connections (Linux).",
)
