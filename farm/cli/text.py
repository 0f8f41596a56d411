"""Words and tables on a terminal: `1 job` / `2 jobs`, `3s ago`, aligned columns, one line of
an error. Every `farm` command writes its counts, ages and tables with these."""

from __future__ import annotations

from collections.abc import Sequence


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 job`, `2 jobs`, `0 jobs` (`many` for words that do not just take an s)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def ago(seconds: float) -> str:
    """`3s ago`, `4m ago`, `2h ago`, `3d ago`."""
    return f"{age(seconds)} ago"


def age(seconds: float) -> str:
    """`3s`, `4m`, `2h`, `3d`: how old something is, in its largest whole unit (under two)."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def first_line(text: str | None, width: int = 100) -> str:
    """The first line of `text`, cut to `width` characters (`…` where cut); "" for None."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first is the header) as left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows)
