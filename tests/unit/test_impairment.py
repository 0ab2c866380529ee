"""
Unit tests for the impaired stream echo (L{echotw.impairment}), how it is
chosen from the options, and impairment over UDP, on in-memory transports
and a L{Clock}.
"""

from __future__ import annotations

import os
from random import Random
from typing import Any, cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IUDPTransport
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.build import makeDatagramImpairment, makeFactory
from echotw.config import EchoConfig, Impairment
from echotw.factory import EchoFactory
from echotw.impairment import (
    PAUSE_ABOVE,
    RESUME_BELOW,
    ImpairedEchoProtocol,
    ReadGate,
    impairedProtocols,
)
from echotw.options import EchoOptions
from echotw.service import EchoService
from echotw.shaping import DatagramImpairment
from echotw.transport.lane import defaultProtocol
from echotw.udp import DROP_REASONS, UDPEchoProtocol
from tests.support.fakes import ClosingTransport, FakeDatagramTransport

CLIENT = IPv4Address("TCP", "10.0.0.1", 40000)


def impairedFactory(clock: Clock, **impairment: Any) -> EchoFactory:
    return EchoFactory(
        clock=clock, protocol=impairedProtocols(clock, random=Random(1), **impairment)
    )


def connect(factory: EchoFactory) -> tuple[ImpairedEchoProtocol, ClosingTransport]:
    p = factory.buildProtocolFor(CLIENT, "l")
    assert isinstance(p, ImpairedEchoProtocol)
    t = ClosingTransport()
    p.makeConnection(t)
    return p, t


def steps(clock: Clock, seconds: float, step: float = 0.01) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


class ImpairedEchoTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_delayedInOrder(self) -> None:
        """Bytes come back after the delay, all of them, in order."""
        p, t = connect(impairedFactory(self.clock, delay=0.2, jitter=0.1))
        payload = os.urandom(10_000)
        for i in range(0, len(payload), 100):
            p.dataReceived(payload[i : i + 100])
            self.clock.advance(0.001)
        self.assertEqual(t.value(), b"")
        self.assertEqual(p.bytesReceived, len(payload))
        steps(self.clock, 0.5, 0.001)
        self.assertEqual(t.value(), payload)

    def test_gateIsTheProducer(self) -> None:
        """The transport's producer is the read gate, not the transport."""
        _p, t = connect(impairedFactory(self.clock, delay=0.1))
        self.assertIsInstance(t.producer, ReadGate)
        self.assertTrue(t.streaming)

    def test_fullQueuePausesReading(self) -> None:
        """More than PAUSE_ABOVE bytes waiting pauses reading; the transport
        draining its own buffer does not resume it; the shaper emptying to
        RESUME_BELOW does."""
        p, t = connect(impairedFactory(self.clock, bandwidth=10_000))
        p.dataReceived(b"x" * (PAUSE_ABOVE + 1000))
        self.assertEqual(t.producerState, "paused")
        gate = t.producer
        assert gate is not None
        gate.pauseProducing()  # the transport's buffer filled...
        gate.resumeProducing()  # ...and drained
        self.assertEqual(t.producerState, "paused")
        while p.pendingBytes() > RESUME_BELOW + 10_000:
            self.clock.advance(0.05)
            self.assertEqual(t.producerState, "paused")
        steps(self.clock, 1.5, 0.05)
        self.assertEqual(t.producerState, "producing")

    def test_fullTransportKeepsReadingPaused(self) -> None:
        """While the transport says its buffer is full, an emptied shaper
        does not resume reading."""
        p, t = connect(impairedFactory(self.clock, delay=0.1))
        gate = t.producer
        assert gate is not None
        gate.pauseProducing()
        p.dataReceived(b"z" * (PAUSE_ABOVE + 1))
        self.clock.advance(0.2)
        self.assertEqual(p.shaper.pendingBytes, 0)
        self.assertEqual(t.producerState, "paused")
        gate.resumeProducing()
        self.assertEqual(t.producerState, "producing")

    def test_fastSenderBoundedByBandwidth(self) -> None:
        """Against 1 kB/s, a sender that writes whenever reading is allowed,
        through a real Twisted write buffer that fills and drains while the
        client reads now and then, never gets more than about two buffers
        held by the server, and gets every byte back in order."""
        fd = FileDescriptor()
        fd.bufferSize = 512
        reading = [True]
        clientReads = [False]
        sent = bytearray()

        def writeSomeData(data: bytes) -> int:
            if not clientReads[0]:
                return 0
            sent.extend(data)
            return len(data)

        fd.stopReading = lambda: reading.__setitem__(0, False)  # type: ignore[method-assign]
        fd.startReading = lambda: reading.__setitem__(0, True)  # type: ignore[method-assign]
        fd.startWriting = lambda: None  # type: ignore[method-assign]
        fd.writeSomeData = writeSomeData  # type: ignore[method-assign]
        fd.connected = True
        p = impairedFactory(self.clock, bandwidth=1000).buildProtocolFor(CLIENT, "l")
        assert p is not None
        p.makeConnection(fd)
        received = bytearray()
        peak = 0
        for i in range(2000):
            clientReads[0] = (i // 200) % 2 == 1
            if reading[0]:
                chunk = os.urandom(65536)
                received += chunk
                p.dataReceived(chunk)
            peak = max(peak, p.pendingBytes())
            self.clock.advance(0.005)
            fd.doWrite()
        self.assertLessEqual(peak, PAUSE_ABOVE + 65536 + 1000)
        self.assertLessEqual(abs(len(sent) - 10_000), 1500)
        self.assertEqual(bytes(sent), bytes(received[: len(sent)]))

    def test_busyWhileDelayed(self) -> None:
        """The idle sweep sees a connection whose echo waits on a delay as
        busy, and counts idleness only from when it has been released."""
        factory = impairedFactory(self.clock, delay=10.0)
        service = EchoService(factory, self.clock, 1.0, idleTimeout=2.0)
        service.startService()
        self.addCleanup(service.stopService)
        p, t = connect(factory)
        p.dataReceived(b"later")
        steps(self.clock, 10.5, 0.5)
        self.assertFalse(t.aborted)
        self.assertEqual(t.value(), b"later")
        steps(self.clock, 1.0, 0.5)
        self.assertFalse(t.aborted)
        steps(self.clock, 2.0, 0.5)
        self.assertTrue(t.aborted)
        self.assertEqual(p.closeReason, "timeout")

    def test_finishWaitsForTheDelay(self) -> None:
        """A close the server starts stops reading at once and happens only
        once every byte received has been echoed, at its time."""
        p, t = connect(impairedFactory(self.clock, delay=1.0))
        p.dataReceived(b"in flight")
        p.finish("server shutdown")
        self.assertEqual(t.producerState, "paused")
        self.assertFalse(t.disconnecting)
        self.clock.advance(0.5)
        p.finish("server shutdown")
        self.assertFalse(t.disconnecting)
        self.clock.advance(0.5)
        self.assertEqual(t.value(), b"in flight")
        self.assertTrue(t.disconnecting)
        self.assertEqual(p.closeReason, "server shutdown")

    def test_finishWithNothingQueued(self) -> None:
        """With nothing waiting a close happens as in the plain echo."""
        p, t = connect(impairedFactory(self.clock, delay=1.0))
        p.finish("denied by reload")
        self.assertTrue(t.disconnecting)
        self.assertIsNone(t.producer)

    def test_halfCloseWaitsForTheDelay(self) -> None:
        """The client's half-close: what waits is echoed, then the close."""
        p, t = connect(impairedFactory(self.clock, delay=0.3))
        p.dataReceived(b"last words")
        p.readConnectionLost()
        self.assertFalse(t.disconnecting)
        self.clock.advance(0.3)
        self.assertEqual(t.value(), b"last words")
        self.assertTrue(t.disconnecting)
        self.assertIsNone(p.closeReason)

    def test_finishThenEndOfInput(self) -> None:
        """A close the server started, then the client's EOF while bytes
        wait: both run once the bytes are out, in that order."""
        p, t = connect(impairedFactory(self.clock, delay=0.3))
        p.dataReceived(b"both")
        calls = []
        t.loseConnection = lambda: calls.append("close")  # type: ignore[method-assign]
        p.finish("server shutdown")
        p.readConnectionLost()
        p.finish("again")
        self.assertEqual(calls, [])
        self.clock.advance(0.3)
        self.assertEqual(t.value(), b"both")
        self.assertTrue(p.finishing)
        self.assertEqual(p.closeReason, "server shutdown")
        self.assertGreaterEqual(len(calls), 1)

    def test_sessionBytesAfterEchoing(self) -> None:
        """--max-session-bytes echoes up to the limit and closes once those
        delayed bytes went out; the rest of the crossing read is discarded."""
        factory = EchoFactory(
            clock=self.clock, maxSessionBytes=10, protocol=impairedProtocols(self.clock, 0.2)
        )
        p, t = connect(factory)
        p.dataReceived(b"0123456789abc")
        self.assertFalse(t.disconnecting)
        self.clock.advance(0.2)
        self.assertEqual((t.value(), t.disconnecting), (b"0123456789", True))
        self.assertEqual(p.closeReason, "max-session-bytes")

    def test_sessionBytesExactAcrossReads(self) -> None:
        """Reads that come after the limit was reached, while the echo still
        waits on the delay (TLS hands several records over at once), are
        discarded, not echoed; the close event counts the limit."""
        factory = impairedFactory(self.clock, delay=0.2)
        factory.maxSessionBytes = 10
        p, t = connect(factory)
        p.dataReceived(b"0123")
        p.dataReceived(b"456789ab")
        p.dataReceived(b"cdef")
        self.assertEqual((p.bytesReceived, p.bytesDiscarded, p.pendingBytes()), (10, 6, 10))
        self.clock.advance(0.2)
        self.assertEqual((t.value(), t.disconnecting), (b"0123456789", True))

    def test_connectionLostCancelsTimer(self) -> None:
        """A lost connection leaves no timer and nothing waiting."""
        p, _t = connect(impairedFactory(self.clock, delay=5.0))
        p.dataReceived(b"never")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(p.pendingBytes(), 0)

    def test_pendingBytesCountsTheQueue(self) -> None:
        """Bytes waiting on the delay are pending."""
        p, _t = connect(impairedFactory(self.clock, delay=1.0))
        p.dataReceived(b"x" * 123)
        self.assertEqual(p.pendingBytes(), 123)

    def test_drainDeliversDelayedBytes(self) -> None:
        """On shutdown the drain lets delayed bytes out before closing,
        within the shutdown timeout."""
        factory = impairedFactory(self.clock, delay=1.0)
        service = EchoService(factory, self.clock, shutdownTimeout=5.0)
        p, t = connect(factory)
        p.dataReceived(b"goodbye")
        d = service.stopService()
        steps(self.clock, 0.9, 0.1)
        self.assertFalse(t.disconnecting)
        steps(self.clock, 0.3, 0.1)
        self.assertEqual(t.value(), b"goodbye")
        self.assertTrue(t.disconnecting)
        self.assertFalse(t.aborted)
        p.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(0.1)
        self.successResultOf(d)


class ChoiceTests(SynchronousTestCase):
    def parse(self, *args: str) -> EchoConfig:
        options = EchoOptions()
        options.parseOptions(list(args))
        return options.config

    def test_offByDefault(self) -> None:
        """Without options nothing is impaired: the plain protocol, no UDP impairment."""
        config = self.parse()
        self.assertEqual(config.impairment, Impairment())
        self.assertFalse(config.impairment.active)
        factory = makeFactory(config, Clock())
        # The plain echo: served by the native lane where it can be.
        self.assertIs(factory.protocol, defaultProtocol())
        self.assertIs(type(factory.buildProtocolFor(CLIENT, "l")), defaultProtocol())
        self.assertIsNone(makeDatagramImpairment(config.impairment, Clock()))

    def test_options(self) -> None:
        """The options fill the configuration, with their units."""
        config = self.parse(
            "--delay", "200ms", "--jitter", "0.05", "--bandwidth", "1.5M", "--udp-loss", "5%"
        )
        self.assertEqual(config.impairment, Impairment(0.2, 0.05, 1_500_000.0, 0.05))
        self.assertIsInstance(makeFactory(config, Clock()).buildProtocolFor(CLIENT, "l"),
                              ImpairedEchoProtocol)  # fmt: skip

    def test_udpLossAloneLeavesStreamsPlain(self) -> None:
        """--udp-loss impairs UDP only."""
        config = self.parse("--udp-loss", "0.5")
        self.assertIs(makeFactory(config, Clock()).protocol, defaultProtocol())
        impairment = makeDatagramImpairment(config.impairment, Clock())
        assert impairment is not None
        self.assertEqual(
            (impairment.loss, impairment.bandwidth, impairment.delay), (0.5, None, None)
        )

    def test_units(self) -> None:
        """Durations in seconds or ms; rates with decimal multipliers."""
        cases = [
            (("--delay", "0.2"), "delay", 0.2),
            (("--delay", "1500ms"), "delay", 1.5),
            (("--jitter", "10ms"), "jitter", 0.01),
            (("--bandwidth", "64k"), "bandwidth", 64_000.0),
            (("--bandwidth", "1M"), "bandwidth", 1_000_000.0),
            (("--bandwidth", "1.5G"), "bandwidth", 1.5e9),
            (("--bandwidth", "500"), "bandwidth", 500.0),
            (("--udp-loss", "0.25"), "udpLoss", 0.25),
            (("--udp-loss", "1"), "udpLoss", 1.0),
        ]
        for args, field, value in cases:
            self.assertEqual(getattr(self.parse(*args).impairment, field), value, args)

    def test_badValues(self) -> None:
        """Bad values are one line naming the option."""
        for args in (
            ["--delay", "-1"], ["--delay", "601"], ["--delay", "fast"], ["--delay", "nan"],
            ["--jitter", "inf"], ["--bandwidth", "1T"], ["--bandwidth", "-5k"],
            ["--bandwidth", "10Mbit"], ["--bandwidth", "0.5"], ["--bandwidth", "200G"],
            ["--udp-loss", "1.5"], ["--udp-loss", "-0.1"], ["--udp-loss", "half"],
        ):  # fmt: skip
            with self.assertRaises(UsageError) as ctx:
                EchoOptions().parseOptions(args)
            message = str(ctx.exception)
            self.assertIn(args[0], message)
            self.assertEqual(len(message.splitlines()), 1, message)


class UDPImpairmentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def udp(self, **impairment: Any) -> tuple[UDPEchoProtocol, FakeDatagramTransport]:
        transport = FakeDatagramTransport()
        proto = UDPEchoProtocol(
            clock=self.clock,
            listener="udp:7",
            rate=0,
            impairment=DatagramImpairment(self.clock, random=Random(2), **impairment),
        )
        proto.makeConnection(cast(IUDPTransport, transport))
        return proto, transport

    def test_newReasonsCounted(self) -> None:
        """The impairment's drop reasons are among those counted (and so
        in the metrics)."""
        for reason in ("impairment-loss", "impairment-bandwidth", "impairment-queue-full",
                       "impairment-shutdown"):  # fmt: skip
            self.assertIn(reason, DROP_REASONS)

    def test_loss(self) -> None:
        """About the share asked for is not echoed, counted as impairment-loss."""
        proto, transport = self.udp(loss=0.5)
        for i in range(1000):
            proto.datagramReceived(b"%d" % i, ("192.0.2.1", 40000))
        echoed = len(transport.written)
        self.assertTrue(400 <= echoed <= 600, echoed)
        self.assertEqual(proto.dropped["impairment-loss"], 1000 - echoed)
        self.assertEqual(proto.datagramsEchoed, echoed)

    def test_delayEachOnItsOwn(self) -> None:
        """Each datagram is echoed to its sender after the delay."""
        proto, transport = self.udp(delay=0.2)
        proto.datagramReceived(b"a", ("192.0.2.1", 40000))
        self.clock.advance(0.1)
        proto.datagramReceived(b"b", ("192.0.2.2", 40001))
        self.clock.advance(0.1)
        self.assertEqual(transport.written, [(b"a", ("192.0.2.1", 40000))])
        self.clock.advance(0.1)
        self.assertEqual(transport.written[1], (b"b", ("192.0.2.2", 40001)))
        self.assertEqual(proto.datagramsEchoed, 2)

    def test_delayQueueFull(self) -> None:
        """Beyond the delay queue's bound datagrams are dropped and counted."""
        proto, transport = self.udp(delay=1.0)
        impairment = proto.impairment
        assert impairment is not None and impairment.delay is not None
        impairment.delay.maxDatagrams = 10
        for i in range(15):
            proto.datagramReceived(b"%d" % i, ("192.0.2.1", 40000))
        self.assertEqual(proto.dropped["impairment-queue-full"], 5)
        self.clock.advance(1)
        self.assertEqual(len(transport.written), 10)

    def test_bandwidthDrops(self) -> None:
        """Over one source's byte rate, replies are dropped as impairment-bandwidth."""
        proto, transport = self.udp(bandwidth=1000)
        for _ in range(5):
            proto.datagramReceived(b"x" * 500, ("192.0.2.1", 40000))
        self.assertEqual(len(transport.written), 1)
        self.assertEqual(proto.dropped["impairment-bandwidth"], 4)

    def test_stopDiscardsDelayed(self) -> None:
        """Datagrams still delayed when the listener stops are counted as
        impairment-shutdown and never sent."""
        proto, transport = self.udp(delay=1.0)
        proto.datagramReceived(b"late", ("192.0.2.1", 40000))
        proto.doStop()
        self.assertEqual(proto.dropped["impairment-shutdown"], 1)
        self.clock.advance(2)
        self.assertEqual(transport.written, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
