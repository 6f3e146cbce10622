"""Start, stop, reload and inspect the nginx master that runs one config.

The master is found through the pid file named in the config and is only
ever signalled after /proc/PID/cmdline shows it is an nginx master started
with that very config file (`nginx: master process ... -c F`).  A stale pid
file therefore never makes us signal a stranger, and other nginx instances
on the machine are never touched.

A config with `omni_model_path DIR;` also has a tokenizer service
(omni_ctl.tokenizer, docs/tokenizer.md): `start` starts it before nginx and
`stop` stops it after nginx, by its own pid file in the prefix.  A config
with `# omni-ctl: agent ARGS` (gen-conf's KV-event options) also has a
KV-event agent (omni_ctl.agent.control, docs/agent.md): `start` runs it after
nginx answers, pushing to nginx's /omni/ingest; `stop` stops it first.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import click

from . import conf as confmod
from . import paths, procfs
from .procfs import cmdline_args
from .procfs import ppid_state as _ppid_state
from .procfs import read_pid as _read_pid
from .agent import control as agentctl
from .tokenizer import control as tokctl

# nginx's compiled-in prefix, against which it resolves a relative -c
DEFAULT_NGINX_PREFIX = "/usr/share/nginx"
DEFAULT_NGINX_CONF = "/etc/nginx/nginx.conf"
_BAD_LOG = re.compile(r"\[(alert|emerg)\]|ERROR: AddressSanitizer|runtime error:")


class NginxCtlError(click.ClickException):
    """A start/stop/reload that did not happen; the message says why."""


class NotRunning(NginxCtlError):
    """The config's nginx is not running (status exits with 3, as LSB's)."""

    exit_code = 3


@dataclasses.dataclass
class ConfFacts:
    """What nginxctl needs to know about a config file, read from it."""

    conf_file: Path
    prefix: Path
    pid_file: Path
    error_log: Path | None
    module_dir: Path | None
    listens: list[str]
    workers: int | None             # worker_processes; None for auto
    model_path: Path | None = None  # omni_model_path: run a tokenizer service
    tokenizer_args: tuple[str, ...] = ()   # `# omni-ctl: tokenizer ARGS`
    agent_args: tuple[str, ...] | None = None  # `# omni-ctl: agent ARGS`


@dataclasses.dataclass
class Status:
    conf_file: Path
    running: bool
    pid: int | None = None
    workers: list[int] = dataclasses.field(default_factory=list)
    listens: list[str] = dataclasses.field(default_factory=list)
    note: str | None = None
    tokenizer: int | None = None    # pid of the config's tokenizer service
    # what runs but cannot work as configured (said on stderr by the CLI)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return {"conf_file": str(self.conf_file), "running": self.running, "pid": self.pid,
                "workers": self.workers, "listen": self.listens, "note": self.note,
                "tokenizer_pid": self.tokenizer, "warnings": self.warnings}


# ---------------------------------------------------------------------------
# reading a config


def _directives(text: str, name: str) -> list[str]:
    """First arguments of `name ...;` directives (comments removed)."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        m = re.match(rf"\s*{name}\s+([^\s;]+)", line)
        if m:
            out.append(m.group(1).strip("\"'"))
    return out


def read_conf(conf_file) -> ConfFacts:
    conf_file = Path(os.path.abspath(conf_file))
    try:
        text = conf_file.read_text()
    except OSError as exc:
        raise NginxCtlError(f"cannot read {conf_file}: {exc.strerror}") from None
    m = re.search(r"^# omni-ctl: prefix=(\S+)$", text, re.M)
    prefix = Path(m.group(1)) if m else conf_file.parent

    def resolve(p: str) -> Path:
        return Path(os.path.normpath(prefix / p))

    pids = _directives(text, "pid")
    if not pids:
        raise NginxCtlError(f"{conf_file} has no `pid` directive; render it with "
                            "`omni-ctl gen-conf` or add one")
    logs = [p for p in _directives(text, "error_log") if p != "stderr"]
    modules = [resolve(p) for p in _directives(text, "load_module")
               if p.endswith(paths.MODULE_FILE)]
    models = _directives(text, "omni_model_path")
    m = re.search(r"^# omni-ctl: tokenizer(.*)$", text, re.M)
    a = re.search(r"^# omni-ctl: agent(.*)$", text, re.M)
    return ConfFacts(
        conf_file=conf_file,
        prefix=prefix,
        pid_file=resolve(pids[0]),
        error_log=resolve(logs[0]) if logs else None,
        module_dir=modules[0].parent if modules else None,
        listens=_directives(text, "listen"),
        workers=next((int(w) for w in _directives(text, "worker_processes")
                      if w.isdigit()), None if "worker_processes" in text else 1),
        model_path=resolve(models[0]) if models else None,
        tokenizer_args=tuple(shlex.split(m.group(1))) if m else (),
        agent_args=(tuple(shlex.split(a.group(1))) if a else None),
    )


def tokenizer_service(facts: ConfFacts) -> tokctl.Service | None:
    """The tokenizer service of a config, None when it names no model."""
    if facts.model_path is None:
        return None
    workers = None if "--workers" in facts.tokenizer_args else facts.workers
    return tokctl.Service.in_prefix(facts.prefix, facts.model_path, workers=workers,
                                    extra=facts.tokenizer_args)


def agent_service(facts: ConfFacts) -> agentctl.AgentService | None:
    """The KV-event agent of a config, None when it has none."""
    if facts.agent_args is None:
        return None
    addr = probe_address(facts.listens[0]) if facts.listens else None
    if addr is None:
        raise NginxCtlError(f"{facts.conf_file}: no address to push the agent's "
                            "batches to (listen)")
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return agentctl.AgentService.in_prefix(
        facts.prefix, facts.conf_file, f"http://{host}:{addr[1]}/omni/ingest",
        facts.agent_args)


# the sidecars a config may run: (what it is called, its service, its control
# module, the control module's error)
def _sidecar(kind: str):
    if kind == "tokenizer":
        return "tokenizer service", tokenizer_service, tokctl, tokctl.TokenizerCtlError
    return "KV-event agent", agent_service, agentctl, agentctl.AgentCtlError


def _start_sidecar(kind: str, facts: ConfFacts, timeout: float) -> int | None:
    name, service, ctl, error = _sidecar(kind)
    svc = service(facts)
    if svc is None:
        return None
    try:
        return ctl.start(svc, timeout=timeout)
    except (error, OSError) as exc:
        raise NginxCtlError(f"{name}: {exc}") from None


def _stop_sidecar(kind: str, facts: ConfFacts, timeout: float) -> int | None:
    """Stop a config's sidecar; its pid, None if none ran."""
    name, service, ctl, error = _sidecar(kind)
    svc = service(facts)
    if svc is None:
        return None
    try:
        return ctl.stop(svc, timeout=timeout)
    except error as exc:
        raise NginxCtlError(f"{name}: {exc}") from None


def start_tokenizer(facts: ConfFacts, timeout: float) -> int | None:
    return _start_sidecar("tokenizer", facts, timeout)


def stop_tokenizer(facts: ConfFacts, timeout: float = 10.0) -> int | None:
    return _stop_sidecar("tokenizer", facts, timeout)


def start_agent(facts: ConfFacts, timeout: float = 30.0) -> int | None:
    return _start_sidecar("agent", facts, timeout)


def stop_agent(facts: ConfFacts, timeout: float = 10.0) -> int | None:
    return _stop_sidecar("agent", facts, timeout)


# ---------------------------------------------------------------------------
# processes


def _cmdline(pid: int) -> str:
    # nginx rewrites its argv into one title string padded with NULs
    return " ".join(cmdline_args(pid))


def conf_from_title(title: str) -> Path | None:
    """The config file named by an nginx master's process title
    (`nginx: master process /usr/sbin/nginx -p P -c F`); None when the
    title is not a master's."""
    if not title.startswith("nginx: master process "):
        return None
    args = title[len("nginx: master process "):].split()[1:]
    found = {"-c": None, "-p": None}
    i = 0
    while i < len(args):
        for flag in found:
            if args[i] == flag and i + 1 < len(args):
                found[flag] = args[i + 1]
                i += 1
            elif args[i].startswith(flag) and len(args[i]) > 2:
                found[flag] = args[i][2:]
        i += 1
    conf = found["-c"] or DEFAULT_NGINX_CONF
    if not os.path.isabs(conf):
        conf = os.path.join(found["-p"] or DEFAULT_NGINX_PREFIX, conf)
    return Path(os.path.normpath(conf))


def master_conf(pid: int) -> Path | None:
    """The config file of a live nginx master, None when pid is not one."""
    state = _ppid_state(pid)
    if state is None or state[1] in ("Z", "X"):
        return None
    return conf_from_title(_cmdline(pid))


def is_master_of(pid: int, conf_file) -> bool:
    """pid is a live nginx master running conf_file: its process title names
    the file, or the title was cut short and the master holds the config's
    error log open. nginx writes its title over the space of its argv and
    environment, and the title is longer than the argv: started with a
    small environment (or one glibc rewrote, as GLIBC_TUNABLES), the end of
    `-c FILE` is cut off."""
    found = master_conf(pid)
    if found is None:
        return False
    try:
        if os.path.samefile(found, conf_file):
            return True
    except OSError:
        if found == Path(os.path.abspath(conf_file)):
            return True
    try:
        log = read_conf(conf_file).error_log
    except NginxCtlError:
        return False
    return log is not None and procfs.holds_open(pid, log)


def workers_of(pid: int, include_shutting_down: bool = False) -> list[int]:
    """Worker processes (children titled `nginx: worker process`) of a master."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        state = _ppid_state(int(entry))
        if state is None or state[0] != pid or state[1] in ("Z", "X"):
            continue
        title = _cmdline(int(entry))
        if not title.startswith("nginx: worker process"):
            continue
        if "shutting down" in title and not include_shutting_down:
            continue
        out.append(int(entry))
    return sorted(out)


def status(conf_file) -> Status:
    facts = read_conf(conf_file)
    svc = tokenizer_service(facts)
    tok = tokctl.running_pid(svc) if svc else None
    pid = _read_pid(facts.pid_file)
    if pid is None:
        return Status(facts.conf_file, False, listens=facts.listens,
                      note=f"no pid in {facts.pid_file}", tokenizer=tok)
    if not is_master_of(pid, facts.conf_file):
        return Status(facts.conf_file, False, listens=facts.listens,
                      note=f"stale pid file {facts.pid_file}: pid {pid} is not the "
                           f"nginx master of {facts.conf_file}; left alone", tokenizer=tok)
    workers = workers_of(pid)
    return Status(facts.conf_file, True, pid, workers, facts.listens, tokenizer=tok,
                  warnings=_socket_warnings(svc, workers))


def _socket_warnings(svc, workers: list[int]) -> list[str]:
    """Whether nginx's workers can reach the tokenizer service's socket: a
    worker that cannot enter its directory schedules every request on the
    byte estimate, which only its error log would say otherwise."""
    creds = procfs.credentials(workers[0]) if svc and workers else None
    if creds is None:
        return []
    blocked = procfs.unsearchable_dir(svc.socket.parent, *creds)
    if blocked is None:
        return []
    return [f"nginx's workers (uid {creds[0]}) cannot enter {blocked}, so they cannot "
            f"reach the tokenizer service at {svc.socket}: every request falls back to "
            f"the byte estimate (omni_tokenize_fallback_total{{reason=\"down\"}}). "
            f"Put the prefix where they can, or render with --user root"]


# ---------------------------------------------------------------------------
# logs


def _log_size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path else 0
    except OSError:
        return 0


def log_since(path: Path | None, offset: int) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def bad_log_lines(text: str) -> list[str]:
    """[alert], [emerg] and sanitizer report lines of an error log."""
    return [line for line in text.splitlines() if _BAD_LOG.search(line)]


def _with_log(message: str, log: str) -> str:
    log = log.strip()
    if not log:
        return message
    lines = log.splitlines()[-20:]
    return message + "\nerror.log:\n" + "\n".join("  " + line for line in lines)


# ---------------------------------------------------------------------------
# readiness


def probe_address(listen: str) -> tuple[str, int] | None:
    """Where to connect to reach a `listen` value (wildcards -> loopback)."""
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", listen) or \
        re.match(r"^([0-9.]+):(\d+)$", listen)
    if m:
        host, port = m.group(1), int(m.group(2))
    elif listen.isdigit():
        host, port = "127.0.0.1", int(listen)
    else:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return host, port


def http_ready(host: str, port: int, timeout: float = 1.0) -> bool:
    """True once a worker answers HTTP (any status) on host:port."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# start / stop / reload


def start(conf_file, timeout: float = 15.0, tokenizer_timeout: float = 120.0) -> Status:
    """Start the config's tokenizer service (when it names a model), then
    nginx on conf_file, and wait until both answer, or raise with the log
    lines they wrote (and stop the service again when nginx fails)."""
    facts = read_conf(conf_file)
    current = status(conf_file)
    if current.running:
        raise NginxCtlError(f"already running: pid {current.pid} ({facts.conf_file})")
    started = current.tokenizer is None and facts.model_path is not None
    start_tokenizer(facts, tokenizer_timeout)
    try:
        st = _start_nginx(conf_file, facts, timeout)
    except BaseException:
        if started:
            stop_tokenizer(facts)
        raise
    try:
        start_agent(facts)
    except BaseException:
        _stop_nginx(conf_file, timeout, 5.0)
        if started:
            stop_tokenizer(facts)
        raise
    return st


def _start_nginx(conf_file, facts: ConfFacts, timeout: float) -> Status:
    try:
        binary = paths.nginx_binary()
    except paths.NginxNotFound as exc:
        raise NginxCtlError(str(exc)) from None
    facts.prefix.mkdir(parents=True, exist_ok=True)
    offset = _log_size(facts.error_log)
    argv = [binary, "-p", str(facts.prefix), "-c", str(facts.conf_file)]
    deadline = time.monotonic() + timeout
    # output to a file, not a pipe: the daemon keeps stderr until it has
    # redirected it to its error log
    with tempfile.TemporaryFile() as out:
        try:
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 env=paths.nginx_env(facts.module_dir), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise NginxCtlError(f"`{' '.join(argv)}` did not return in {timeout:g}s") from None
        out.seek(0)
        output = out.read().decode("utf-8", "replace").strip()
    if res.returncode != 0:
        raise NginxCtlError(_with_log(
            f"nginx failed to start (exit {res.returncode}): {output}",
            log_since(facts.error_log, offset)))

    probe = next((a for a in map(probe_address, facts.listens) if a), None)
    while True:
        st = status(conf_file)
        if (st.running and len(st.workers) >= (facts.workers or 1)
                and (probe is None or http_ready(*probe))):
            return st
        if time.monotonic() > deadline:
            break
        log = log_since(facts.error_log, offset)
        if bad_log_lines(log) and not st.running:
            break
        time.sleep(0.05)
    st = status(conf_file)
    raise NginxCtlError(_with_log(
        f"nginx did not become ready within {timeout:g}s "
        f"({'master pid %d running' % st.pid if st.running else 'not running'})",
        log_since(facts.error_log, offset)))


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass                    # it exited in the meantime
    except PermissionError:
        raise NginxCtlError(f"not permitted to send {sig.name} to nginx master {pid} "
                            "(started by another user?)") from None


def _wait_gone(pid: int, conf_file, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_master_of(pid, conf_file):
            return True
        time.sleep(0.05)
    return not is_master_of(pid, conf_file)


def stop(conf_file, timeout: float = 10.0, term_timeout: float = 5.0) -> Status:
    """Graceful stop (QUIT), then TERM after timeout; then the tokenizer
    service.  Returns the status seen before stopping (running=False: there
    was no nginx to stop; tokenizer: the service's pid, None if none ran)."""
    stop_agent(read_conf(conf_file), timeout)
    before = _stop_nginx(conf_file, timeout, term_timeout)
    before.tokenizer = stop_tokenizer(read_conf(conf_file), timeout)
    return before


def _stop_nginx(conf_file, timeout: float, term_timeout: float) -> Status:
    before = status(conf_file)
    if not before.running:
        return before
    pid = before.pid
    _signal(pid, signal.SIGQUIT)
    if _wait_gone(pid, conf_file, timeout):
        return before
    if is_master_of(pid, conf_file):
        _signal(pid, signal.SIGTERM)
    if _wait_gone(pid, conf_file, term_timeout):
        return before
    raise NginxCtlError(f"nginx master {pid} did not exit after QUIT ({timeout:g}s) "
                        f"and TERM ({term_timeout:g}s)")


def upgrade(conf_file, timeout: float = 30.0, drain_timeout: float = 600.0) -> Status:
    """Binary upgrade on the fly, nginx's way: USR2 makes the master start
    the nginx binary on disk as a new master (same config, same listening
    sockets, its own shared zone); WINCH makes the old master's workers stop
    accepting and finish the requests they hold; QUIT then ends the old
    master.  Waits for each step; returns the new master's status.  If the
    new binary does not come up, the old master keeps serving untouched."""
    facts = read_conf(conf_file)
    before = status(conf_file)
    if not before.running:
        raise NotRunning(f"not running ({before.note}); use `omni-ctl start`")
    old = before.pid
    confmod.nginx_test(facts.conf_file, facts.prefix, facts.module_dir)
    offset = _log_size(facts.error_log)
    _signal(old, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while True:
        pid = _read_pid(facts.pid_file)
        if (pid and pid != old and is_master_of(pid, facts.conf_file)
                and len(workers_of(pid)) >= (facts.workers or 1)):
            new = pid
            break
        log = log_since(facts.error_log, offset)
        failed = [line for line in log.splitlines()
                  if "[emerg]" in line or "execve()" in line]
        if failed or time.monotonic() > deadline:
            raise NginxCtlError(_with_log(
                f"the new nginx master did not start within {timeout:g}s after USR2; "
                f"the old master {old} keeps serving", log))
        time.sleep(0.05)
    # the old workers finish what they hold, accepting nothing new
    _signal(old, signal.SIGWINCH)
    deadline = time.monotonic() + drain_timeout
    while workers_of(old, include_shutting_down=True):
        if time.monotonic() > deadline:
            raise NginxCtlError(
                f"the old workers still hold requests after {drain_timeout:g}s; both "
                f"masters run (old {old}, new {new}): QUIT {old} to finish, or HUP "
                f"{old} and QUIT {new} to go back")
        time.sleep(0.05)
    _signal(old, signal.SIGQUIT)
    if not _wait_gone(old, facts.conf_file, timeout):
        raise NginxCtlError(f"the old nginx master {old} did not exit after QUIT")
    return status(conf_file)


def rollback_file(conf_file) -> Path:
    """Swap conf_file with conf_file.prev; returns the backup path."""
    conf_file = Path(os.path.abspath(conf_file))
    bak = confmod.backup_path(conf_file)
    if not bak.is_file():
        raise NginxCtlError(f"no previous config to roll back to ({bak} does not exist)")
    current = conf_file.read_text()
    confmod.install_file(conf_file, bak.read_text(), backup=False)
    confmod.install_file(bak, current, backup=False)
    return bak


def reload(conf_file, new_text: str | None = None, rollback: bool = False,
           timeout: float = 15.0) -> Status:
    """Test the config (new_text when given, else the file, else the previous
    file with rollback) and send HUP; wait until new workers run.  On a
    failed test nothing is signalled and the file on disk is unchanged."""
    facts = read_conf(conf_file)
    before = status(conf_file)
    if not before.running:
        raise NotRunning(f"not running ({before.note}); use `omni-ctl start`")

    # what to put back if nginx refuses the new config at reload time
    saved = {p: p.read_text() for p in (facts.conf_file, confmod.backup_path(facts.conf_file))
             if p.is_file()}

    if rollback:
        rollback_file(facts.conf_file)
        try:
            confmod.nginx_test(facts.conf_file, facts.prefix, facts.module_dir)
        except confmod.NginxTestError:
            rollback_file(facts.conf_file)
            raise
    elif new_text is not None:
        new_pid = _directives(new_text, "pid")
        if not new_pid or os.path.normpath(facts.prefix / new_pid[0]) != str(facts.pid_file):
            raise NginxCtlError(f"the new config moves the pid file away from "
                                f"{facts.pid_file}; stop and start instead of reloading")
        fd, tmp = tempfile.mkstemp(prefix=f".{facts.conf_file.name}.", suffix=".check",
                                   dir=facts.conf_file.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new_text)
            confmod.nginx_test(tmp, facts.prefix, facts.module_dir)
        finally:
            os.unlink(tmp)
        confmod.install_file(facts.conf_file, new_text)
    else:
        confmod.nginx_test(facts.conf_file, facts.prefix, facts.module_dir)

    # a config that now names a model needs its tokenizer service before the
    # new workers connect to it; stopped again if nginx refuses the config
    added = _start_added_tokenizer(conf_file, before)
    try:
        st = _hup_and_wait(conf_file, facts, before, saved, timeout)
    except BaseException:
        if added is not None:
            stop_tokenizer(added)
        raise
    if before.tokenizer is not None and read_conf(conf_file).model_path is None:
        # the new workers no longer use it, and `stop` reads the new config
        stop_tokenizer(facts)
        st.tokenizer = None
    return st


def _start_added_tokenizer(conf_file, before: Status) -> ConfFacts | None:
    """Start the tokenizer service of the config about to be reloaded when
    it names a model and no service runs (a reload that adds --model-path);
    the facts it was started for, None when nothing was started."""
    new = read_conf(conf_file)
    if new.model_path is None or before.tokenizer is not None:
        return None
    svc = tokenizer_service(new)
    if tokctl.running_pid(svc) is not None:
        return None
    start_tokenizer(new, 120.0)
    return new


def _hup_and_wait(conf_file, facts: ConfFacts, before: Status, saved: dict,
                  timeout: float) -> Status:
    # a re-rendered file may name another log; the master logs to the old one
    offset = _log_size(facts.error_log)
    old = set(before.workers) | set(workers_of(before.pid, include_shutting_down=True))
    _signal(before.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = log_since(facts.error_log, offset)
        refused = [line for line in log.splitlines() if "[emerg]" in line]
        if refused:
            for path, text in saved.items():
                confmod.install_file(path, text, backup=False)
            raise NginxCtlError(_with_log(
                f"nginx refused the new config and keeps running the old one "
                f"({facts.conf_file} is back as it was)", "\n".join(refused)))
        current = workers_of(before.pid)
        new = [w for w in current if w not in old]
        # done when the new generation runs and the old one has been told
        # to quit (it may finish its open requests for a while)
        if len(new) >= (read_conf(conf_file).workers or 1) and len(new) == len(current):
            st = status(conf_file)
            st.workers = [w for w in st.workers if w not in old]
            return st
        if not is_master_of(before.pid, facts.conf_file):
            raise NginxCtlError(_with_log("nginx exited during reload", log))
        time.sleep(0.05)
    raise NginxCtlError(_with_log(f"no new workers within {timeout:g}s after HUP",
                                  log_since(facts.error_log, offset)))
