"""The documentation holds together: README.md is a front page of at most 300 lines, each
docs/ page is under 400, every relative link in them reaches a file (and every #anchor a
heading of that file), and the README still carries the test command .ci/run reads.

Pages added later under docs/ are checked the same way without being named here, and
need not be in the index to pass.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); a target ends at whitespace or ")" (titles after a space)
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks: a `# comment` in a shell block is no heading."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (backticks, dots,
    colons, ...), word characters, hyphens and underscores kept, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(prose(path.read_text(encoding="utf-8"))):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", prose(path.read_text(encoding="utf-8")))
    return [m.group(1) for m in LINK.finditer(text)]


def broken_links(path: Path) -> list[str]:
    """Relative links of one page that reach no file, or no heading of the file they name."""
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_readme_is_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300)"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_docs_page_can_be_finished(page: Path) -> None:
    n = len(page.read_text(encoding="utf-8").splitlines())
    assert n < 400, f"{page.name} has {n} lines (under 400)"


def test_readme_keeps_the_test_command() -> None:
    """.ci/run runs the line two below the marker (the marker, a ```bash fence, the
    command): it must be there, install the test extras and run pytest."""
    lines = README.read_text(encoding="utf-8").splitlines()
    marker = lines.index("<!-- test-command -->")
    assert lines[marker + 1].startswith("```")
    command = lines[marker + 2]
    assert ".[train,test]" in command and "pytest" in command
    assert lines[marker + 3] == "```"


def test_readme_keeps_the_offline_install_command() -> None:
    """The first command installs and estimates from the built-in catalog (no network)."""
    text = README.read_text(encoding="utf-8")
    first = re.search(r"```bash\n(.+)\n```", text)
    assert first is not None
    assert first.group(1).startswith("pip install . && zeroplan estimate llama-3.1-8b-instruct")


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    """The checks above can fail: a missing file, a missing heading, a heading that only a
    code block holds, and a repeated heading's second anchor."""
    (tmp_path / "other.md").write_text("# Title\n\n## `zeroplan watch`\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```\n# not a heading\n```\n\n"
        "[ok](other.md#zeroplan-watch) [ok](other.md#twice-1) [ok](#page) "
        "[web](https://example.com/x) `[code](nowhere.md)`\n\n"
        "[gone](missing.md) [anchor](other.md#nope) [code-heading](#not-a-heading)\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nope: no heading #nope in other.md",
        "#not-a-heading: no heading #not-a-heading in page.md",
    ]
