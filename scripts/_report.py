"""Tables printed with rich and collected as Markdown, for the scripts that regenerate README tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


class Report:
    def __init__(self, width: int = 200):
        self.console = Console(width=width)
        self.lines: list[str] = []

    def table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        t = Table(title=title)
        for h in header:
            t.add_column(h, justify="left" if h == header[0] else "right")
        for r in rows:
            t.add_row(*r)
        self.console.print(t)
        self.lines += [f"**{title}**\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]

    def note(self, text: str) -> None:
        self.lines.append(text)

    def markdown(self) -> str:
        return "\n".join(self.lines) + "\n"
