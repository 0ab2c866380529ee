"""
Tests for L{echotw.rules.files}: what a rule file may hold (generated files
with comments, blank lines, CRLF, surrounding spaces and bad lines), and
what is refused before it can hurt: devices, FIFOs, directories, over-long
lines.
"""

from __future__ import annotations

import os
import tempfile
import threading
import tracemalloc
from ipaddress import ip_network
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.options import EchoOptions
from echotw.rules.addresses import IPNetwork, foldMapped
from echotw.rules.files import MAX_LINE_BYTES, RuleFileError, RuleSource, readRuleFile
from tests.support.properties import PROPERTIES, networks
from tests.unit.test_housekeeping import client, writeFile

SPACE = st.sampled_from(["", " ", "\t", "  ", " \t "])
LINE_END = st.sampled_from([b"\n", b"\r\n"])
COMMENT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40
)


@st.composite
def networkLines(draw: st.DrawFn) -> tuple[str, IPNetwork]:
    """
    One network written as an operator might: CIDR, full form, a bare
    address for one host; spaces around it, perhaps a comment after it.
    """
    network = draw(networks())
    forms = [network.with_prefixlen, network.exploded]
    if network.prefixlen == network.max_prefixlen:
        forms.append(str(network.network_address))
    text = draw(st.sampled_from(forms))
    comment = draw(st.one_of(st.just(""), COMMENT.map(lambda c: f"#{c}")))
    return draw(SPACE) + text + draw(SPACE) + comment, network


@st.composite
def ruleFiles(draw: st.DrawFn) -> tuple[list[bytes], list[IPNetwork]]:
    """
    The lines of a rule file, each with its line end (CRLF or LF; the last
    perhaps without one), and the networks it lists.
    """
    lines: list[bytes] = []
    listed: list[IPNetwork] = []
    for kind in draw(st.lists(st.sampled_from(["network", "blank", "comment"]), max_size=20)):
        if kind == "network":
            text, network = draw(networkLines())
            listed.append(network)
        elif kind == "blank":
            text = draw(SPACE)
        else:
            text = draw(SPACE) + "#" + draw(COMMENT)
        lines.append(text.encode("utf-8") + draw(LINE_END))
    if lines and draw(st.booleans()):
        lines[-1] = lines[-1].rstrip(b"\r\n")
    return lines, listed


def notANetwork(text: str) -> bool:
    try:
        ip_network(text.strip())
    except ValueError:
        return True
    return False


@st.composite
def badLines(draw: st.DrawFn) -> bytes:
    """
    A line no rule file may hold: a network with host bits set, something
    that is no address, an over-long line, bytes that are not UTF-8.
    """
    kind = draw(st.sampled_from(["host bits", "garbage", "long", "not UTF-8"]))
    if kind == "host bits":
        network = draw(networks().filter(lambda n: n.prefixlen < n.max_prefixlen))
        return f"{network.broadcast_address}/{network.prefixlen}".encode()
    if kind == "garbage":
        text = draw(
            st.text(st.characters(blacklist_characters="#\r\n", max_codepoint=0x7F), min_size=1)
        )
        return (
            draw(SPACE).encode() + text.encode()
            if text.strip() and notANetwork(text)
            else b"10.0.0.1/33"
        )
    if kind == "long":
        return b"10.0.0.0/8 #" + b"x" * draw(st.integers(MAX_LINE_BYTES - 11, MAX_LINE_BYTES + 200))
    return b"10.0.0.0/8 # caf\xe9"


class RuleFilePropertyTests(SynchronousTestCase):
    """
    Generated rule files parse to exactly the networks written in them; a
    bad line anywhere is an error naming the file and that line.
    """

    def setUp(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(), "generated.rules")
        self.addCleanup(lambda: Path(self.path).unlink(missing_ok=True))

    def write(self, lines: list[bytes]) -> None:
        with open(self.path, "wb") as f:
            f.write(b"".join(lines))

    @settings(PROPERTIES, max_examples=50)
    @given(ruleFiles())
    def test_parsedNetworksAreTheOnesWritten(
        self, generated: tuple[list[bytes], list[IPNetwork]]
    ) -> None:
        """Comments, blank lines, CRLF and LF line ends and spaces around
        entries leave exactly the networks written, in order (an IPv4-mapped
        one as the IPv4 network it maps)."""
        lines, listed = generated
        self.write(lines)
        self.assertEqual(readRuleFile(self.path), [foldMapped(n) for n in listed])

    @settings(PROPERTIES, max_examples=50)
    @given(ruleFiles(), badLines(), LINE_END, st.data())
    def test_badLineNamesFileAndLine(
        self,
        generated: tuple[list[bytes], list[IPNetwork]],
        bad: bytes,
        end: bytes,
        data: st.DataObject,
    ) -> None:
        """A bad line anywhere in a file is one error, naming the file and
        the bad line's number."""
        lines = generated[0]
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        at = data.draw(st.integers(0, len(lines)))
        lines.insert(at, bad + end)
        self.write(lines)
        if len(bad) > MAX_LINE_BYTES:
            expected = f"{self.path}:{at + 1}: line longer than {MAX_LINE_BYTES} bytes"
        else:
            expected = f"{self.path}:{at + 1}: "
        with self.assertRaises(RuleFileError) as ctx:
            readRuleFile(self.path)
        message = str(ctx.exception)
        self.assertTrue(message.startswith(expected), (message, expected))
        self.assertNotIn("\n", message)
        self.assertEqual(ctx.exception.path, self.path)


class RuleFileHardeningTests(SynchronousTestCase):
    """
    What is not a rule file is refused with one line naming it, before it
    can grow memory without bound or block the server.
    """

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()

    def assertRefused(self, path: str, why: str) -> None:
        with self.assertRaises(RuleFileError) as ctx:
            readRuleFile(path)
        self.assertEqual(str(ctx.exception), f"{path}: {why}")
        for option in ("--allow-file", "--deny-file"):
            with self.assertRaises(UsageError) as usage:
                EchoOptions().parseOptions([option, path])
            self.assertEqual(str(usage.exception), f"{option}: {path}: {why}")

    def test_deviceRefused(self) -> None:
        """C{/dev/zero}, which would never end, is refused at once."""
        self.assertRefused("/dev/zero", "not a regular file (a character device)")

    def test_directoryRefused(self) -> None:
        """A directory is refused."""
        self.assertRefused(self.directory, "not a regular file (a directory)")

    def test_missingFile(self) -> None:
        """A file that does not exist is refused with the system's reason."""
        self.assertRefused(
            os.path.join(self.directory, "nope"), "cannot read: No such file or directory"
        )

    def test_fifoRefusedWithoutBlocking(self) -> None:
        """A FIFO nobody writes to is refused at once instead of blocking
        the server until someone does."""
        fifo = os.path.join(self.directory, "rules.fifo")
        os.mkfifo(fifo)
        errors: list[str] = []

        def read() -> None:
            try:
                readRuleFile(fifo)
            except RuleFileError as e:
                errors.append(str(e))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(10)
        if reader.is_alive():
            # Release the blocked reader: a writer that opens and closes.
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(10)
            self.fail("reading a FIFO blocked")
        self.assertEqual(errors, [f"{fifo}: not a regular file (a FIFO)"])
        self.assertRefused(fifo, "not a regular file (a FIFO)")

    def test_linkToRegularFileRead(self) -> None:
        """A symbolic link to a regular file is read (as /etc/alternatives
        and configuration managers make them)."""
        target = os.path.join(self.directory, "target")
        Path(target).write_text("192.0.2.0/24\n")
        link = os.path.join(self.directory, "link")
        os.symlink(target, link)
        self.assertEqual([str(n) for n in readRuleFile(link)], ["192.0.2.0/24"])
        os.unlink(link)
        os.symlink("/dev/zero", link)
        self.assertRefused(link, "not a regular file (a character device)")

    def test_lineLengthCap(self) -> None:
        """A line of 1,024 bytes is read, CRLF or LF after it; one byte more
        is an error naming the file and line."""
        path = os.path.join(self.directory, "long.rules")
        longest = b"10.0.0.0/8 #".ljust(MAX_LINE_BYTES, b"x")
        for end in (b"\n", b"\r\n", b""):
            Path(path).write_bytes(b"# first\n" + longest + end)
            self.assertEqual([str(n) for n in readRuleFile(path)], ["10.0.0.0/8"])
            Path(path).write_bytes(b"# first\n" + longest + b"x" + end + b"192.0.2.1\n")
            with self.assertRaises(RuleFileError) as ctx:
                readRuleFile(path)
            self.assertEqual(
                str(ctx.exception), f"{path}:2: line longer than {MAX_LINE_BYTES} bytes"
            )

    def test_hugeLineReadInBoundedMemory(self) -> None:
        """A gigabyte without a line end (a sparse file) is refused after
        reading about one line's worth of it."""
        path = os.path.join(self.directory, "sparse.rules")
        with open(path, "wb") as f:
            f.truncate(1 << 30)
        tracemalloc.start()
        try:
            with self.assertRaises(RuleFileError) as ctx:
                readRuleFile(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertIn(f"{path}:1: line longer than", str(ctx.exception))
        self.assertLess(peak, 256 * 1024)

    def test_notUTF8NamesTheLine(self) -> None:
        """Bytes that are not UTF-8 are an error naming the file and line."""
        path = os.path.join(self.directory, "latin1.rules")
        Path(path).write_bytes(b"10.0.0.0/8\n192.0.2.0/24 # caf\xe9\n")
        with self.assertRaises(RuleFileError) as ctx:
            readRuleFile(path)
        self.assertEqual(str(ctx.exception), f"{path}:2: not UTF-8 text")

    def test_byteOrderMarkIgnored(self) -> None:
        """A UTF-8 byte order mark (some Windows editors write one) is not
        part of the first entry."""
        path = os.path.join(self.directory, "bom.rules")
        Path(path).write_bytes(b"\xef\xbb\xbf10.0.0.0/8\r\n")
        self.assertEqual([str(n) for n in readRuleFile(path)], ["10.0.0.0/8"])

    def test_failedLoadBuildsNothing(self) -> None:
        """One bad file among several fails the whole load."""
        good = os.path.join(self.directory, "good.rules")
        Path(good).write_text("10.0.0.0/8\n")
        source = RuleSource(allowFiles=[good], denyFiles=["/dev/zero"])
        self.assertRaises(RuleFileError, source.load)


class RuleFileTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """Addresses and networks of both families, comments and blank lines."""
        path = writeFile(
            self,
            """
            # office
            192.0.2.0/24   # the LAN
            2001:db8::/32

            203.0.113.7
            """,
        )
        self.assertEqual(
            [str(n) for n in readRuleFile(path)],
            ["192.0.2.0/24", "2001:db8::/32", "203.0.113.7/32"],
        )

    def test_errorNamesFileAndLine(self) -> None:
        """A bad line is an error naming the file and the line number."""
        path = writeFile(self, "10.0.0.0/8\n\n10.1.2.3/8\n")
        with self.assertRaises(RuleFileError) as ctx:
            readRuleFile(path)
        self.assertIn(f"{path}:3:", str(ctx.exception))
        missing = path + ".missing"
        with self.assertRaises(RuleFileError) as ctx:
            readRuleFile(missing)
        self.assertIn(missing, str(ctx.exception))

    def test_emptyAllowFileAdmitsNobody(self) -> None:
        """An allow file with no entries still restricts to those listed."""
        rules = RuleSource(allowFiles=[writeFile(self, "# nobody yet\n")]).load()
        self.assertEqual(rules(client(), "l"), "not allowed")

    def test_largeFile(self) -> None:
        """100,000 networks load and match exactly."""
        path = writeFile(
            self,
            "".join(f"10.{i >> 8 & 255}.{i & 255}.{i >> 16 << 7}/25\n" for i in range(100_000)),
        )
        rules = RuleSource(allowFiles=[path]).load()
        self.assertEqual(len(rules.allow), 100_000)
        self.assertIsNone(rules(client("10.3.7.100"), "l"))
        self.assertEqual(rules(client("11.3.7.100"), "l"), "not allowed")

    def test_optionsCombineFilesAndFlags(self) -> None:
        """--allow-file and --deny-file combine with --allow and --deny."""
        allow = writeFile(self, "10.0.0.0/8\n")
        deny = writeFile(self, "10.6.0.0/16\n")
        options = EchoOptions()
        options.parseOptions(
            [
                "--allow",
                "192.0.2.1",
                "--allow-file",
                allow,
                "--deny-file",
                deny,
                "--deny",
                "10.7.7.7",
            ]
        )
        rules = options.config.rules
        self.assertIsNone(rules(client("192.0.2.1"), "l"))
        self.assertIsNone(rules(client("10.1.1.1"), "l"))
        self.assertEqual(rules(client("10.6.1.1"), "l"), "denied")
        self.assertEqual(rules(client("10.7.7.7"), "l"), "denied")
        self.assertEqual(rules(client("192.0.2.2"), "l"), "not allowed")

    def test_badFileAtStartIsUsageError(self) -> None:
        """A bad file at start-up is a one-line usage error naming the option,
        the file and the line."""
        path = writeFile(self, "nonsense\n")
        for option in ["--allow-file", "--deny-file"]:
            with self.assertRaises(UsageError) as ctx:
                EchoOptions().parseOptions([option, path])
            message = str(ctx.exception)
            self.assertTrue(message.startswith(option), message)
            self.assertIn(f"{path}:1:", message)
            self.assertNotIn("\n", message)
