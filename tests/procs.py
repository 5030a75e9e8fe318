"""The process tree through /proc (Linux), for tests that check nothing a command started outlives it."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (state first, parent pid second), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def descendants(root: int) -> set[int]:
    """Every live process below `root` (children, grandchildren, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        if (fields := stat_fields(int(entry.name))) and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found
