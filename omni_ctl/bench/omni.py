"""Omni Proxy as a benchmark target, driven through its public CLI only
(`omni-ctl gen-conf`, `omni-ctl start`, `omni-ctl stop`): the benchmark never
imports the proxy's code, so it measures what a user would run."""

from __future__ import annotations

import os
import subprocess
import sys

from . import procs
from .errors import BenchError


class NotAvailable(Exception):
    """Omni Proxy cannot run in this build; the message says why."""


def _omni_ctl(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omni_ctl.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


class OmniProxy:
    """A running Omni Proxy (nginx master started by `omni-ctl start`)."""

    def __init__(self, name: str, conf: str, prefix: str):
        self.name, self.conf, self.prefix = name, conf, prefix
        self.log_path = os.path.join(prefix, "error.log")
        self._running = True

    def alive(self) -> bool:
        return self._running

    def log_tail(self, n: int = 2000) -> str:
        return procs.tail(self.log_path, n)

    def stop(self) -> None:
        if self._running:
            self._running = False
            res = _omni_ctl("stop", "--nginx-conf-file", self.conf)
            if res.returncode != 0:
                raise BenchError(f"omni-ctl stop --nginx-conf-file {self.conf} failed: "
                                 f"{(res.stderr or res.stdout).strip()}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def gen_conf_args(prefix: str, port: int, pd_policy: str, *, workers: int,
                  prefill, decode, bootstrap_ports=None, schedule_policy=None,
                  start_core: int = 0, extra=()) -> list[str]:
    """`omni-ctl gen-conf` arguments for a proxy on 127.0.0.1:port."""
    conf = os.path.join(prefix, "nginx.conf")
    if pd_policy == "parallel" and bootstrap_ports:
        prefill = [f"{ep}@{bp}" for ep, bp in zip(prefill, bootstrap_ports)]
    args = ["gen-conf", "--nginx-conf-file", conf, "--prefix", prefix,
            "--listen-port", str(port), "--core-num", str(workers),
            "--start-core-index", str(start_core), "--pd-policy", pd_policy,
            "--log-file", os.path.join(prefix, "error.log"), "--log-level", "error"]
    if prefill:
        args += ["--prefill-endpoints", ",".join(prefill)]
    if decode:
        args += ["--decode-endpoints", ",".join(decode)]
    if schedule_policy:
        args += ["--schedule-policy", schedule_policy]
    return args + list(extra)


def module_label(module_dir: str | None = None) -> dict:
    """Which module build a run used, for labelling results: its directory
    and BUILD_INFO (debug=1 means a sanitizer build, far slower)."""
    d = module_dir or os.environ.get("OMNI_MODULE_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "build", "modules")
    info = {"module_dir": d}
    try:
        with open(os.path.join(d, "BUILD_INFO")) as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key in ("debug", "nginx_version"):
                    info[key] = value
    except OSError:
        pass
    return info


def start_proxy(prefix: str, port: int, pd_policy: str, *, workers: int = 1,
                prefill=(), decode=(), bootstrap_ports=None, schedule_policy=None,
                start_core: int = 0, module_dir: str | None = None,
                extra=()) -> OmniProxy:
    """Render a config with `omni-ctl gen-conf` and start it with `omni-ctl
    start`. Raises NotAvailable when this build has no proxy yet."""
    os.makedirs(prefix, exist_ok=True)
    if module_dir:
        extra = ["--module-dir", os.path.abspath(module_dir), *extra]
    if os.geteuid() == 0 and "--user" not in extra:
        # run as root, the results often sit in a directory private to root
        # (a pytest or mkdtemp directory, /root/...) that nginx's default
        # worker user cannot enter: its temp files and the tokenizer's
        # socket would be out of reach (every request on the estimate)
        extra = [*extra, "--user", "root"]
    if (os.cpu_count() or 1) < start_core + workers:
        start_core = 0
        workers = min(workers, os.cpu_count() or 1)
    args = gen_conf_args(prefix, port, pd_policy, workers=workers, prefill=list(prefill),
                         decode=list(decode), bootstrap_ports=bootstrap_ports,
                         schedule_policy=schedule_policy, start_core=start_core,
                         extra=extra)
    _check(_omni_ctl(*args), "gen-conf", args)
    conf = args[args.index("--nginx-conf-file") + 1]
    _check(_omni_ctl("start", "--nginx-conf-file", conf), "start",
           ["start", "--nginx-conf-file", conf])
    return OmniProxy(f"omni-{pd_policy}", conf, prefix)


def _check(res: subprocess.CompletedProcess, command: str, args) -> None:
    """A command this build lacks (or lacks an option of) is NotAvailable;
    any other failure is an error."""
    if res.returncode == 0:
        return
    msg = (res.stderr or res.stdout).strip()
    if "not available in this build" in msg or "no such option" in msg.lower():
        last = msg.splitlines()[-1] if msg else ""
        raise NotAvailable(f"omni-ctl {command} in this build cannot run it yet: {last}")
    raise BenchError(f"omni-ctl {' '.join(args)} failed: {msg}")


def available() -> str | None:
    """None when this build can run Omni Proxy targets, else why not."""
    for command in ("gen-conf", "start", "stop"):
        res = _omni_ctl(command, "--help")
        if "--nginx-conf-file" not in res.stdout:
            return f"omni-ctl {command} is not in this build yet"
    return None
