"""Processes the benchmarks start and stop themselves: plain nginx (proxy or
canned backend) and peer routers. Each is started as our own child, waited for
with a deadline, and stopped by its pid only (never by name)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jinja2

from .errors import BenchError


def template_dir() -> Path:
    """templates/ in a source checkout (editable install) or the installed
    omni_ctl.templates package data."""
    here = Path(__file__).resolve().parents[2] / "templates"
    if (here / "plain_nginx.conf.j2").is_file():
        return here
    import importlib.resources
    return Path(str(importlib.resources.files("omni_ctl.templates")))


def render_plain_nginx(prefix: str, listen_ports, *, mode: str, workers: int = 1,
                       upstreams=(), canned_body: str | None = None,
                       log_level: str = "error", start_core: int | None = None,
                       mirror=()) -> str:
    """Write <prefix>/nginx.conf for plain nginx and return its path. With
    start_core, worker i is pinned to core start_core + i (as gen-conf does);
    with mirror upstreams (proxy mode), every request also goes whole to one
    of them."""
    if mode == "proxy" and not upstreams:
        raise BenchError("plain nginx proxy needs at least one upstream")
    if mode == "canned":
        bad = [c for c in "'\\$" if c in (canned_body or "")]
        if not canned_body or bad:
            raise BenchError(f"canned body must be non-empty without {bad}")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir())),
                             undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True,
                             lstrip_blocks=True)
    text = env.get_template("plain_nginx.conf.j2").render(
        prefix=prefix, listen_ports=list(listen_ports), mode=mode, workers=workers,
        upstreams=list(upstreams), canned_body=canned_body or "", log_level=log_level,
        mirror=list(mirror) if mode == "proxy" else [],
        cpu_affinity=[] if start_core is None else
        ["1" + "0" * (start_core + i) for i in range(workers)])
    os.makedirs(prefix, exist_ok=True)
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


def nginx_binary() -> str:
    path = os.environ.get("OMNI_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(path, os.X_OK):
        raise BenchError(f"nginx not found (looked for '{path}'); install nginx "
                         f"or set OMNI_NGINX")
    return path


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: str, n: int = 2000) -> str:
    """The last n bytes of a log file ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: str, env=None,
                 stop_signal=signal.SIGTERM):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.stop_signal = stop_signal
        self._log = open(log_path, "ab")
        try:
            self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            self._log.close()
            raise BenchError(f"cannot start {name} ({argv[0]}): {exc}") from None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        return tail(self.log_path, n)

    def stop(self, timeout: float = 10.0) -> None:
        """Signal our own child by pid, wait, and kill it if it lingers."""
        if self.alive():
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                # nginx: QUIT waits for open connections; TERM does not, and
                # still takes the workers down (KILL of the master would not).
                self.popen.terminate()
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(5)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_nginx(name: str, conf: str, prefix: str) -> Proc:
    """nginx in the foreground (`daemon off` is in our template); QUIT stops it."""
    binary = nginx_binary()
    test = subprocess.run([binary, "-t", "-q", "-p", prefix, "-c", conf],
                          capture_output=True, text=True)
    if test.returncode != 0:
        raise BenchError(f"{name}: nginx -t failed for {conf}: {test.stderr.strip()}")
    return Proc(name, [binary, "-p", prefix, "-c", conf],
                os.path.join(prefix, "stdout.log"), stop_signal=signal.SIGQUIT)


def wait_http(proc: Proc | None, url: str, body: bytes | None = None,
              timeout: float = 30.0, what: str = "") -> None:
    """Wait until `url` answers 200 (POST `body` when given), or fail with the
    process's log."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise BenchError(f"{what or proc.name} exited with {proc.popen.returncode}; "
                             f"log {proc.log_path}:\n{proc.log_tail()}")
        req = urllib.request.Request(url, data=body, method="POST" if body else "GET",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    resp.read()
                    return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.1)
    tail = proc.log_tail() if proc is not None else ""
    raise BenchError(f"{what or url} not ready within {timeout:g} s ({last}); {tail}")


def venv_bin(name: str) -> str | None:
    """A console script next to this Python (the project's .venv), else on PATH."""
    cand = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(cand, os.X_OK):
        return cand
    return shutil.which(name)
