"""Small /proc readers shared by the process managers (nginxctl and the
tokenizer service's control)."""

from __future__ import annotations

import os
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


def holds_open(pid: int, path) -> bool:
    """Whether a process has `path` open (False when it is gone or its
    descriptors are not ours to read)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    want = os.path.abspath(path)
    for fd in fds:
        try:
            if os.readlink(os.path.join(fd_dir, fd)) == want:
                return True
        except OSError:
            continue
    return False


def credentials(pid: int) -> tuple[int, set[int]] | None:
    """(effective uid, every gid: effective and supplementary) of a process;
    None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    uid = int(fields["Uid"].split()[1])
    gids = {int(fields["Gid"].split()[1]), *map(int, fields.get("Groups", "").split())}
    return uid, gids


def unsearchable_dir(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The outermost directory on the way to `path` (itself included) that
    a process of uid/gids cannot enter (no search permission); None when it
    can reach it, or when uid is root.  Directories that do not exist yet
    are skipped (whoever creates them decides)."""
    if uid == 0:
        return None
    blocked = None
    for d in [path, *path.parents]:
        try:
            st = os.stat(d)
        except OSError:
            continue
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid in gids:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            blocked = d                     # keep the outermost
    return blocked
