"""Start and stop the KV-event agent that belongs to one nginx config.

A config rendered with KV-event options (`gen-conf --kv-events-port...`)
carries a `# omni-ctl: agent ARGS` line; `omni-ctl start` runs
`omni-ctl agent --conf CONF --push http://LISTEN/omni/ingest ARGS` after
nginx answers, `omni-ctl stop` stops it before nginx.  The agent's pid file
and log are in the nginx prefix; a pid is only signalled after its command
line shows it is the agent of that very config.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..procfs import cmdline_args, ppid_state, read_pid
from ..tokenizer.control import _log_tail

PID_NAME = "agent.pid"
LOG_NAME = "agent.log"


class AgentCtlError(RuntimeError):
    """A start or stop that did not happen; the message says why."""


@dataclasses.dataclass
class AgentService:
    conf_file: Path
    push_url: str
    pid_file: Path
    log_file: Path
    extra: tuple[str, ...] = ()

    @classmethod
    def in_prefix(cls, prefix, conf_file, push_url, extra=()) -> "AgentService":
        prefix = Path(prefix)
        return cls(Path(conf_file), push_url, prefix / PID_NAME,
                   prefix / "logs" / LOG_NAME, tuple(extra))

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "omni_ctl.cli", "agent",
                "--conf", str(self.conf_file), "--push", self.push_url,
                *self.extra]


def is_agent(pid: int, conf_file) -> bool:
    """pid is a live `omni-ctl agent` reading conf_file."""
    state = ppid_state(pid)
    if state is None or state[1] in ("Z", "X"):
        return False
    args = cmdline_args(pid)
    return ("agent" in args and "--conf" in args
            and args[args.index("--conf") + 1:][:1] == [str(conf_file)])


def running_pid(svc: AgentService) -> int | None:
    pid = read_pid(svc.pid_file)
    return pid if pid is not None and is_agent(pid, svc.conf_file) else None


def start(svc: AgentService, timeout: float = 30.0) -> int:
    """Run the agent in the background; returns its pid once it has read
    the config (its first log line).  Raises with its log otherwise."""
    pid = running_pid(svc)
    if pid is not None:
        return pid
    svc.log_file.parent.mkdir(parents=True, exist_ok=True)
    offset = svc.log_file.stat().st_size if svc.log_file.exists() else 0
    with open(svc.log_file, "ab") as log:
        proc = subprocess.Popen(svc.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
    svc.pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            svc.pid_file.unlink(missing_ok=True)
            raise AgentCtlError(f"the agent exited ({proc.returncode}) at start; "
                                f"{svc.log_file}:\n{_log_tail(svc.log_file, offset)}")
        if "instance(s)" in _log_tail(svc.log_file, offset):
            return proc.pid
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    svc.pid_file.unlink(missing_ok=True)
    raise AgentCtlError(f"the agent did not start within {timeout:g}s; "
                        f"{svc.log_file}:\n{_log_tail(svc.log_file, offset)}")


def stop(svc: AgentService, timeout: float = 10.0) -> int | None:
    """TERM the agent (it flushes its last batch), KILL after timeout; its
    pid, None if none ran."""
    pid = running_pid(svc)
    if pid is None:
        svc.pid_file.unlink(missing_ok=True)
        return None
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and is_agent(pid, svc.conf_file):
            time.sleep(0.05)
        if not is_agent(pid, svc.conf_file):
            break
    else:
        raise AgentCtlError(f"agent pid {pid} did not exit after TERM and KILL")
    svc.pid_file.unlink(missing_ok=True)
    return pid
