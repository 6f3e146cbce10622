"""Small /proc readers shared by the process managers (nginxctl and the
tokenizer service's control)."""

from __future__ import annotations

from pathlib import Path


def read_pid(pid_file: Path) -> int | None:
    """The pid in a pid file; None when it is missing or not a number."""
    try:
        text = Path(pid_file).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def ppid_state(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a process; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[1]), fields[0]


def cmdline_args(pid: int) -> list[str]:
    """A process's argv ([] when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]
