"""The one writer of benchmark reports (`benchmarks/results/*.md`).

Every `seekformer bench ...` verb measures, then renders its figures with `table()` under a header made by
`header()` -- title, the command that made the figures, and the machine they were measured on (CPU, cores,
threads, torch, date, load average before and after: the machine is often shared, so the reports compare
ratios measured interleaved in one run) -- and writes the file atomically with `write_report()`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..fsio import atomic_write_text
from ..runtime import loadavg


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def command_line(verb: str | None = None) -> str:
    """The command that is running, as a user would type it: `seekformer bench VERB ...` (from this process's
    argv, starting at VERB when given), else the argv as it is."""
    argv = list(sys.argv)
    if verb is not None and verb in argv:
        return "seekformer bench " + " ".join(argv[argv.index(verb):])
    return " ".join(["seekformer", *argv[1:]]) if argv and argv[0].endswith("seekformer") else " ".join(argv)


class Machine:
    """What the figures were measured on; create it before measuring (it takes the load average then) and
    call `line()` after (which adds the load average at the end)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads if threads is not None else torch.get_num_threads()
        self.start = _dt.datetime.now(_dt.timezone.utc)
        self.load_before = loadavg()

    def line(self) -> str:
        load_after = loadavg()
        load = ("n/a" if self.load_before is None or load_after is None
                else f"{self.load_before:.1f} before / {load_after:.1f} after")
        return (f"{cpu_name()}, {os.cpu_count()} cores, {self.threads} thread(s), torch {torch.__version__}, "
                f"{self.start:%Y-%m-%d %H:%M} UTC, load average (1 min) {load}.")


def header(title: str, command: str, machine: Machine | str) -> list[str]:
    """The first lines of every report: `# title`, the command, the machine."""
    line = machine.line() if isinstance(machine, Machine) else machine
    return [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {line}", ""]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """A markdown table. `align` has one letter per column: `l` (left) or `r` (right); default: the first
    column left, the rest right (labels, then figures). Cells are already formatted; None renders as `-`."""
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(headers)} columns")
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} columns")
        out.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return out


def render(lines: Iterable[str]) -> str:
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(path: str | os.PathLike, lines: Iterable[str] | str) -> Path:
    """Write a report atomically (a reader never sees half a file); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, lines if isinstance(lines, str) else render(lines))
    return out
