"""Start and stop a tokenizer service by its pid file (for `omni-ctl start`
and `stop`, and the tests).

The service is only ever signalled after /proc/PID/cmdline shows it is an
`omni-ctl tokenizer` serving that very socket, so a stale pid file never
makes us signal a stranger.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..procfs import cmdline_args, ppid_state, read_pid

SOCKET_NAME = "tokenizer.sock"
PID_NAME = "tokenizer.pid"
LOG_NAME = "tokenizer.log"
# the nginx module sends answers to LEARN_NAME.<worker index> in its prefix
LEARN_NAME = "tokenizer.learn"


class TokenizerCtlError(RuntimeError):
    """A start or stop that did not happen; the message says why."""


@dataclasses.dataclass
class Service:
    """Where one service lives (all inside the nginx prefix by default)."""

    model_path: str
    socket: Path
    pid_file: Path
    log_file: Path
    workers: int | None = None
    chat_template: str | None = None
    extra: tuple[str, ...] = ()
    # answer learning: worker i reads the proxy's answers on LEARN.i
    learn_socket: Path | None = None

    @classmethod
    def in_prefix(cls, prefix, model_path, **kw) -> "Service":
        prefix = Path(prefix)
        kw.setdefault("learn_socket", prefix / LEARN_NAME)
        return cls(str(model_path), prefix / SOCKET_NAME, prefix / PID_NAME,
                   prefix / "logs" / LOG_NAME, **kw)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "omni_ctl.cli", "tokenizer",
                "--model-path", self.model_path, "--socket", str(self.socket),
                "--pid-file", str(self.pid_file)]
        if self.workers:
            argv += ["--workers", str(self.workers)]
        if self.chat_template:
            argv += ["--chat-template", self.chat_template]
        if self.learn_socket:
            argv += ["--learn-socket", str(self.learn_socket)]
        return argv + list(self.extra)


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def request(path, method: str, target: str, body: bytes | None = None,
            timeout: float = 10.0) -> tuple[int, str, bytes]:
    """One HTTP request to the service at socket path: (status, type, body)."""
    conn = _UnixHTTP(path, timeout)
    try:
        conn.request(method, target, body=body,
                     headers={"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        conn.close()


def ready(path, timeout: float = 1.0) -> bool:
    try:
        return request(path, "GET", "/health", timeout=timeout)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def is_service(pid: int, socket_path) -> bool:
    """pid is a live `omni-ctl tokenizer` serving socket_path."""
    state = ppid_state(pid)
    if state is None or state[1] in ("Z", "X"):
        return False
    args = cmdline_args(pid)
    return ("tokenizer" in args and "--socket" in args
            and args[args.index("--socket") + 1:][:1] == [str(socket_path)])


def running_pid(svc: Service) -> int | None:
    pid = read_pid(svc.pid_file)
    return pid if pid is not None and is_service(pid, svc.socket) else None


def _log_tail(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("  " + line for line in lines[-20:])


def start(svc: Service, timeout: float = 60.0) -> int:
    """Start the service in the background and wait until it answers
    /health; returns its pid.  Raises with the end of its log otherwise."""
    pid = running_pid(svc)
    if pid is not None:
        if ready(svc.socket):
            return pid
        raise TokenizerCtlError(f"tokenizer pid {pid} runs but does not answer "
                                f"on {svc.socket}")
    svc.log_file.parent.mkdir(parents=True, exist_ok=True)
    svc.socket.parent.mkdir(parents=True, exist_ok=True)
    offset = svc.log_file.stat().st_size if svc.log_file.exists() else 0
    with open(svc.log_file, "ab") as log:
        proc = subprocess.Popen(svc.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TokenizerCtlError(
                f"the tokenizer service exited ({proc.returncode}) at start; "
                f"{svc.log_file}:\n{_log_tail(svc.log_file, offset)}")
        if read_pid(svc.pid_file) == proc.pid and ready(svc.socket):
            return proc.pid
        time.sleep(0.05)
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    raise TokenizerCtlError(f"the tokenizer service did not answer on {svc.socket} "
                            f"within {timeout:g}s; {svc.log_file}:\n"
                            f"{_log_tail(svc.log_file, offset)}")


def stop(svc: Service, timeout: float = 10.0) -> int | None:
    """TERM the service (KILL after timeout); its pid, None if none ran."""
    pid = running_pid(svc)
    if pid is None:
        return None
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return pid
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not is_service(pid, svc.socket):
                return pid
            time.sleep(0.05)
    raise TokenizerCtlError(f"tokenizer pid {pid} did not exit after TERM and KILL")



def worker_pids(pid: int) -> list[int]:
    """The live worker processes (children) of a running service."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = ppid_state(int(entry))
            if state is not None and state[0] == pid and state[1] not in ("Z", "X"):
                out.append(int(entry))
    return sorted(out)
