"""
The documentation holds together: every relative link and #anchor in
README.md, ARCHITECTURE.md and docs/ leads somewhere, the option tables of
docs/options.md are what C{twistd echo --help} says, and the README stays
short enough to read.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote

from twisted.trial.unittest import SynchronousTestCase

from tests import ROOT

DOCS = ROOT / "docs"

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).*?\1")


def pages() -> list[Path]:
    """The Markdown files whose links are checked."""
    return [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> list[str]:
    """The lines of C{text} outside fenced code blocks (those become blank)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return lines


def slug(heading: str) -> str:
    """
    The anchor GitHub gives a heading: its text without Markdown, lower
    case, punctuation dropped (letters, digits, spaces, C{-} and C{_}
    kept), spaces turned into hyphens.
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a heading of C{path} defines, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text()):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        base = slug(heading[1])
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """The targets of C{path}'s inline links and images, with line numbers."""
    found = []
    for number, line in enumerate(prose(path.read_text()), 1):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match[1]))
    return found


def brokenLinks(path: Path, root: Path = ROOT) -> list[str]:
    """
    Each relative link or anchor in C{path} that leads nowhere, described
    with its place relative to C{root}.
    """
    broken = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto: ...
        file, _, anchor = target.partition("#")
        destination = (path.parent / unquote(file)).resolve() if file else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not destination.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and destination.suffix == ".md":
            if anchor not in anchors(destination):
                broken.append(f"{where} (no such heading)")
        elif anchor and destination.is_dir() and anchor not in anchors(destination / "README.md"):
            broken.append(f"{where} (no such heading)")
    return broken


def optionsDoc() -> ModuleType:
    """tools/optionsdoc.py, which writes the option tables."""
    spec = importlib.util.spec_from_file_location("optionsdoc", ROOT / "tools" / "optionsdoc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paragraphs(text: str) -> list[str]:
    """
    The prose paragraphs and list items of C{text}: no code, tables or
    headings.
    """
    found: list[list[str]] = [[]]
    for line in prose(text):
        stripped = line.strip()
        if not stripped or stripped.startswith(("|", "#", "![", "<!--")):
            found.append([])
        elif re.match(r"^([-*]|\d+\.)\s", stripped):
            found.append([stripped])
        else:
            found[-1].append(stripped)
    return [" ".join(lines) for lines in found if lines]


class SlugTests(SynchronousTestCase):
    def directory(self) -> Path:
        """A fresh directory, removed after the test."""
        path = Path(tempfile.mkdtemp(prefix="echotw-docs-"))
        self.addCleanup(shutil.rmtree, path)
        return path

    def test_githubSlugs(self) -> None:
        """Headings become the anchors GitHub makes of them."""
        self.assertEqual(slug("Two commands"), "two-commands")
        self.assertEqual(
            slug("Behind a load balancer: the PROXY protocol"),
            "behind-a-load-balancer-the-proxy-protocol",
        )
        self.assertEqual(
            slug("`echotw-probe`: a verifying client"), "echotw-probe-a-verifying-client"
        )
        self.assertEqual(slug("Shutdown, signals & exit"), "shutdown-signals--exit")
        self.assertEqual(slug("[TLS](tls.md) set-up"), "tls-set-up")

    def test_duplicateHeadingsNumbered(self) -> None:
        """A second heading of the same text is reached as C{-1}."""
        path = self.directory() / "page.md"
        path.write_text("# A\n\n## Notes\n\n```\n# not a heading\n```\n\n## Notes\n")
        self.assertEqual(anchors(path), {"a", "notes", "notes-1"})

    def test_brokenLinksFound(self) -> None:
        """A missing file, a missing heading and a link to a directory's
        README are told apart; links in code are not links."""
        directory = self.directory()
        (directory / "sub").mkdir()
        (directory / "sub" / "README.md").write_text("# Sub\n")
        page = directory / "page.md"
        page.write_text(
            "# Page\n\n[ok](#page) [ok](sub/) [ok](sub/#sub) [web](https://example.com/#x)\n"
            "[gone](missing.md) [nowhere](#nothing) `[code](missing.md)`\n"
            "```\n[fenced](missing.md)\n```\n"
        )
        self.assertEqual(
            brokenLinks(page, directory),
            [
                "page.md:4: missing.md (no such file)",
                "page.md:4: #nothing (no such heading)",
            ],
        )


class DocsTests(SynchronousTestCase):
    def test_linksResolve(self) -> None:
        """Every relative link and #anchor in README.md, ARCHITECTURE.md
        and docs/*.md names a file that exists and, for Markdown, a heading
        in it."""
        broken = [problem for path in pages() for problem in brokenLinks(path)]
        self.assertEqual(broken, [], "\n".join(broken))

    def test_everyPageIndexed(self) -> None:
        """docs/README.md links to every page in docs/."""
        index = DOCS / "README.md"
        linked = {
            (DOCS / target.partition("#")[0]).resolve() for _, target in links(index) if target
        }
        missing = [p.name for p in DOCS.glob("*.md") if p != index and p.resolve() not in linked]
        self.assertEqual(missing, [])

    def test_optionsMatchHelp(self) -> None:
        """The option tables in docs/options.md are those made from the
        help texts and defaults C{--help} prints; if not, the failure names
        the command that regenerates them."""
        tool = optionsDoc()
        page = (DOCS / "options.md").read_text()
        expected = tool.render(page, tool.optionTables())
        self.assertTrue(
            page == expected,
            f"docs/options.md does not match twistd echo --help: run {tool.COMMAND}",
        )

    def test_optionTablesListEveryOption(self) -> None:
        """Every option echo has appears in the tables, once."""
        from echotw.options import EchoOptions

        tool = optionsDoc()
        tables = tool.optionTables()
        for name in {opt.rstrip("=") for opt in EchoOptions().longOpt}:
            rows = re.findall(rf"(?m)^\| (?:`-\w`, )?`--{re.escape(name)}[ `]", tables)
            self.assertEqual(len(rows), 1, name)

    def test_regenerationIsStable(self) -> None:
        """Regenerating changes only the text between the markers, and a
        second run changes nothing."""
        tool = optionsDoc()
        page = "before\n" + tool.BEGIN + "\nstale\n" + tool.END + "\nafter\n"
        once = tool.render(page, "| new |\n")
        self.assertEqual(once, "before\n" + tool.BEGIN + "\n| new |\n" + tool.END + "\nafter\n")
        self.assertEqual(tool.render(once, "| new |\n"), once)

    def test_readmeShort(self) -> None:
        """README.md stays a page one reads: at most 250 lines."""
        lines = (ROOT / "README.md").read_text().splitlines()
        self.assertLessEqual(len(lines), 250)

    def test_paragraphsShort(self) -> None:
        """No paragraph or list item in README.md or docs/ runs past 150
        words."""
        long = []
        for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
            for paragraph in paragraphs(path.read_text()):
                words = len(paragraph.split())
                if words > 150:
                    long.append(f"{path.relative_to(ROOT)}: {words} words: {paragraph[:60]}...")
        self.assertEqual(long, [], "\n".join(long))
