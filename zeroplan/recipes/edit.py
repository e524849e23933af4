"""A line-level editor for the top-level keys of a YAML recipe, and a JSON one.

Recipes are commented by hand; a YAML round trip through a parser would drop every
comment and reorder keys. So the editor works on lines: a top-level key's block is its
line plus the indented (or ``- item``) lines under it; a changed value replaces the block
(a one-line key keeps its comment and gains ``# zeroplan: was OLD``); a removed key is commented out; a new
key is appended at the end. Everything else stays byte for byte.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

_KEY = re.compile(r"^(?P<key>[A-Za-z_][\w.-]*)\s*:(?P<rest>.*)$")
NOTE = "# zeroplan"


def _blocks(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Top-level key -> (first line, one past its last line)."""
    out: dict[str, tuple[int, int]] = {}
    starts = [(i, m.group("key")) for i, line in enumerate(lines) if (m := _KEY.match(line))]
    for n, (i, key) in enumerate(starts):
        end = i + 1
        limit = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        while end < limit and (lines[end][:1] in (" ", "\t", "-") or not lines[end].strip()):
            end += 1
        while end > i + 1 and not lines[end - 1].strip():
            end -= 1  # trailing blank lines stay between the blocks
        out.setdefault(key, (i, end))  # a recipe with a key twice is refused on reading
    return out


def _render(key: str, value: Any) -> list[str]:
    import yaml

    text = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False, width=1000)
    lines: list[str] = text.splitlines(keepends=True)
    return lines


def _comment_of(line: str) -> str:
    """The trailing ``  # ...`` of a one-line ``key: value``: the first '#' after a space
    that is outside quotes."""
    body = line.rstrip("\n")
    for m in re.finditer(r"\s+#", body):
        before = body[: m.start()]
        if before.count("'") % 2 == 0 and before.count('"') % 2 == 0:
            return body[m.start() :]
    return ""


def edit_yaml(text: str, edits: dict[str, Any]) -> str:
    """``text`` with each top-level key of ``edits`` set to its value (None: commented
    out; a key not in the text: appended)."""
    import yaml

    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    appended: list[str] = []
    # later edits first, so that earlier line numbers stay valid
    blocks = _blocks(lines)
    order = sorted(
        ((blocks.get(k, (len(lines) + 1, 0)), k, v) for k, v in edits.items()),
        key=lambda t: t[0][0],
        reverse=True,
    )
    for (start, end), key, value in order:
        if key not in blocks:
            if value is not None:
                new = _render(key, value)
                new[0] = new[0].rstrip("\n") + f"  {NOTE}\n"
                appended[:0] = new
            continue
        old = yaml.safe_load("".join(lines[start:end]))
        if isinstance(old, dict) and old.get(key) == value:
            continue
        if value is None:
            lines[start:end] = [f"# {line}" if line.strip() else line for line in lines[start:end]]
            lines[start] = lines[start].rstrip("\n") + f"  {NOTE}: not in the plan\n"
            continue
        new = _render(key, value)
        if len(new) == 1 and end - start == 1:
            # a one-line value: keep the user's comment, say what it was
            was = lines[start].split(":", 1)[1].strip()
            tail = _comment_of(lines[start])
            was = was[: len(was) - len(tail.strip())].strip() if tail else was
            new[0] = new[0].rstrip("\n") + f"{tail}  {NOTE}: was {was}\n"
        lines[start:end] = new
    if appended:
        if lines and lines[-1].strip():
            lines.append("\n")
        lines += appended
    return "".join(lines)


def edit_json(text: str, edits: dict[str, Any]) -> str:
    """A JSON recipe with ``edits`` applied (keys in their order; None: null)."""
    data = json.loads(text)
    for key, value in edits.items():
        if value is None and key not in data:
            continue
        data[key] = value
    return json.dumps(data, indent=2) + "\n"


def unified_diff(old: str, new: str, before: str, after: str) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), before, after
        )
    )
