"""`omni-ctl gen-conf` as plain functions: validate the options into a
`ProxyConf`, render nginx.conf from templates/nginx.conf.j2, test it with
`nginx -t` and install it atomically (keeping the previous file as F.prev).

Nothing is written before every option has been validated, and a file that
fails `nginx -t` never replaces the installed one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import click
import jinja2

from . import __version__, paths

PD_POLICIES = ("sequential", "parallel", "aggregated")
SCHEDULE_POLICIES = ("omni", "cache-aware", "least-loaded", "round-robin")
QUEUE_ORDERS = ("sjf", "fcfs")
LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")

# SGLang's default bootstrap port, used for a prefill endpoint without @PORT
DEFAULT_BOOTSTRAP_PORT = 8998

# nginx's own error pages (HTML) replaced by OpenAI-style JSON bodies:
# status -> (status sent, error type, message)
ERROR_PAGES = {
    400: (400, "invalid_request_error", "bad request"),
    403: (403, "permission_error", "forbidden"),
    404: (404, "invalid_request_error", "not found"),
    405: (405, "invalid_request_error", "method not allowed"),
    408: (408, "invalid_request_error", "request timed out"),
    413: (413, "invalid_request_error", "request body too large"),
    414: (414, "invalid_request_error", "request URI too long"),
    494: (400, "invalid_request_error", "request header too large"),
    500: (500, "server_error", "internal server error"),
    502: (502, "server_error", "bad gateway: the upstream instance failed"),
    503: (503, "server_error", "service unavailable"),
    504: (504, "server_error", "gateway timeout: the upstream instance did not answer in time"),
}

# Option defaults (the values used when an option is not given).  Durations
# and sizes use nginx's syntax; see docs/configuration.md.
DEFAULTS = {
    "prefix": None,                       # the conf file's directory
    "prefill_endpoints": "",
    "decode_endpoints": "",
    "listen_host": "127.0.0.1",
    "listen_port": 8080,
    "core_num": 1,
    "start_core_index": 0,
    "pd_policy": "sequential",
    "schedule_policy": "omni",
    "prefill_queue_order": "sjf",
    "model_path": None,
    "log_file": None,                     # <prefix>/error.log
    "log_level": "warn",
    "access_log_file": None,              # <prefix>/access.log; "off" disables
    "max_batch_num_token": 16384,
    "prefill_max_num_seqs": 16,
    "decode_max_num_seqs": 256,
    "prefill_starvation_timeout": "2000ms",
    "queue_max": 4096,
    "queue_timeout": "600s",
    "decode_max_tokens": 0,
    "hold_slack": "20ms",
    "block_size": 256,
    "index_max_tokens": 131072,
    "cache_blocks": 0,
    "cache_ttl": "600s",
    "worker_connections": 4096,
    "zone_size": "64m",
    "prefill_read_timeout": "600s",
    "decode_read_timeout": "600s",
    "connect_timeout": "10s",
    "keepalive": 256,
    "max_body_size": "64m",
    "max_fails": 3,
    "fail_timeout": "10s",
    "module_dir": None,                   # paths.module_dir()
    "user": None,                         # nginx's compiled-in worker user
}

# Characters that would need quoting or change meaning in nginx.conf
# (`$` starts a variable in log paths, `#` a comment, `;{}` end directives).
_UNSAFE_PATH = re.compile(r"""[\s;{}"'\\$#]""")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_DURATION = re.compile(r"^(\d+)(ms|s|m|h)?$")
_SIZE = re.compile(r"^(\d+)([kKmMgG]?)$")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class ConfError(click.ClickException):
    """A bad option value; the message names the option and the value."""

    def __init__(self, option: str, value, reason: str):
        self.option = option
        self.value = value
        super().__init__(f"invalid {option} {str(value)!r}: {reason}")


class NginxTestError(click.ClickException):
    """`nginx -t` rejected a rendered configuration."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str                       # IPv4 literal, compressed IPv6, or a name
    port: int
    bootstrap_port: int | None = None

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def address(self) -> str:
        """host:port as nginx writes a peer's name ([v6]:port)."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class ProxyConf:
    """Validated gen-conf options, ready to render."""

    conf_file: Path
    prefix: Path
    prefill: tuple[Endpoint, ...]
    decode: tuple[Endpoint, ...]
    listen_host: str
    listen_port: int
    cores: tuple[int, ...]
    pd_policy: str
    schedule_policy: str
    prefill_queue_order: str
    model_path: Path | None
    log_file: Path
    log_level: str
    access_log_file: Path | None
    max_batch_num_token: int
    prefill_max_num_seqs: int
    decode_max_num_seqs: int
    prefill_starvation_timeout_ms: int
    queue_max: int
    queue_timeout_ms: int
    decode_max_tokens: int
    hold_slack_ms: int
    block_size: int
    index_max_tokens: int
    cache_blocks: int
    cache_ttl_ms: int
    worker_connections: int
    zone_size: str
    prefill_read_timeout_ms: int
    decode_read_timeout_ms: int
    connect_timeout_ms: int
    keepalive: int
    max_body_size: str
    max_fails: int
    fail_timeout_ms: int
    module_dir: Path
    user: str | None

    @property
    def module_path(self) -> Path:
        return paths.module_path(self.module_dir)

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def listen(self) -> str:
        if ":" in self.listen_host:
            return f"[{self.listen_host}]:{self.listen_port}"
        return f"{self.listen_host}:{self.listen_port}"


# ---------------------------------------------------------------------------
# parsing of single values


def cpu_count() -> int:
    """Cores on this machine (OMNI_CPU_COUNT overrides, for tests)."""
    env = os.environ.get("OMNI_CPU_COUNT")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ConfError("OMNI_CPU_COUNT", env, "must be an integer") from None
        if n < 1:
            raise ConfError("OMNI_CPU_COUNT", env, "must be at least 1")
        return n
    return os.cpu_count() or 1


def parse_int(option: str, value, minimum: int | None = None,
              maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise ConfError(option, value, "must be an integer")
    try:
        n = int(str(value).strip(), 10)
    except ValueError:
        raise ConfError(option, value, "must be an integer") from None
    if minimum is not None and n < minimum:
        if maximum is not None:
            raise ConfError(option, value, f"must be between {minimum} and {maximum}")
        raise ConfError(option, value, f"must be at least {minimum}")
    if maximum is not None and n > maximum:
        raise ConfError(option, value, f"must be between {minimum} and {maximum}")
    return n


def parse_duration(option: str, value, default_unit: str = "s",
                   minimum_ms: int = 1) -> int:
    """nginx-style duration ("600s", "2000ms", "10m", "1h"; a bare number is
    in default_unit) -> milliseconds."""
    m = _DURATION.match(str(value).strip())
    if not m:
        raise ConfError(option, value, "must be a duration such as 500ms, 30s, 10m or 1h")
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[m.group(2) or default_unit]
    ms = int(m.group(1)) * scale
    if ms < minimum_ms:
        raise ConfError(option, value, f"must be at least {minimum_ms}ms")
    return ms


def format_duration(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def parse_size(option: str, value, minimum: int = 0) -> str:
    """nginx-style size ("64m", "512k", bytes) -> normalized text."""
    m = _SIZE.match(str(value).strip())
    if not m:
        raise ConfError(option, value, "must be a size such as 512k, 64m or 1g")
    unit = m.group(2).lower()
    nbytes = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]
    if nbytes < minimum:
        raise ConfError(option, value, f"must be at least {minimum >> 10}k")
    return f"{int(m.group(1))}{unit}"


def parse_path(option: str, value, base: Path | None = None) -> Path:
    text = str(value)
    if not text.strip():
        raise ConfError(option, value, "must not be empty")
    if _UNSAFE_PATH.search(text):
        raise ConfError(option, value,
                        "must not contain spaces, quotes, ';', '{', '}', '$', '#' or '\\'")
    path = Path(text)
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return Path(os.path.normpath(path))


def parse_endpoint(option: str, text: str) -> Endpoint:
    """H:P, [V6]:P, optionally @BOOTSTRAP_PORT."""
    item = text.strip()
    hostport, at, boot = item.partition("@")
    bootstrap = None
    if at:
        bootstrap = _port(option, item, boot, "bootstrap port")
    if hostport.startswith("["):
        host, sep, port = hostport[1:].partition("]:")
        if not sep:
            raise ConfError(option, item, "expected [IPv6]:PORT")
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise ConfError(option, item, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = hostport.rpartition(":")
        if not sep or not host:
            raise ConfError(option, item, "expected HOST:PORT (e.g. 127.0.0.1:8001)")
        if ":" in host:
            raise ConfError(option, item, "write IPv6 addresses in brackets, e.g. [::1]:8001")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise ConfError(option, item, f"{host!r} is not an IPv4 address") from None
        elif not _HOSTNAME.match(host):
            raise ConfError(option, item, f"{host!r} is not a valid host name")
    return Endpoint(host, _port(option, item, port, "port"), bootstrap)


def _port(option: str, item: str, text: str, what: str) -> int:
    if not text.isdigit():
        raise ConfError(option, item, f"{what} {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfError(option, item, f"{what} {port} is out of range (1-65535)")
    return port


def parse_endpoints(option: str, value) -> tuple[Endpoint, ...]:
    """A comma-separated list (or a list of strings); '' is an empty list."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    if isinstance(value, str) and not value.strip():
        return ()
    endpoints = []
    seen = set()
    for raw in items:
        if not str(raw).strip():
            raise ConfError(option, value, "has an empty entry (stray comma?)")
        ep = parse_endpoint(option, str(raw))
        if ep.address in seen:
            raise ConfError(option, value, f"lists {ep.address} twice")
        seen.add(ep.address)
        endpoints.append(ep)
    return tuple(endpoints)


def parse_listen_host(value) -> str:
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        raise ConfError("--listen-host", value,
                        "must be an IP address (127.0.0.1, 0.0.0.0, ::1, ::)") from None


def _choice(option: str, value, choices) -> str:
    if value not in choices:
        raise ConfError(option, value, f"must be one of {', '.join(choices)}")
    return value


# ---------------------------------------------------------------------------
# the whole option set


def make_conf(nginx_conf_file, allow_missing_cores: bool = False,
              **options) -> ProxyConf:
    """Validate gen-conf options (names as in DEFAULTS; None means "not
    given") into a ProxyConf.  Raises ConfError naming the first bad one.
    allow_missing_cores accepts cores this machine does not have (a config
    rendered for another machine)."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown gen-conf options: {', '.join(sorted(unknown))}")
    o = dict(DEFAULTS)
    o.update({k: v for k, v in options.items() if v is not None})

    if nginx_conf_file is None:
        raise ConfError("--nginx-conf-file", "", "is required")
    conf_file = parse_path("--nginx-conf-file", nginx_conf_file)
    if conf_file.is_dir():
        raise ConfError("--nginx-conf-file", nginx_conf_file, "is a directory")
    prefix = (parse_path("--prefix", o["prefix"]) if o["prefix"] is not None
              else conf_file.parent)
    if prefix.exists() and not prefix.is_dir():
        raise ConfError("--prefix", o["prefix"], "exists and is not a directory")

    pd_policy = _choice("--pd-policy", o["pd_policy"], PD_POLICIES)
    prefill = parse_endpoints("--prefill-endpoints", o["prefill_endpoints"])
    decode = parse_endpoints("--decode-endpoints", o["decode_endpoints"])
    if not decode:
        raise ConfError("--decode-endpoints", o["decode_endpoints"],
                        f"--pd-policy {pd_policy} needs at least one decode endpoint")
    if pd_policy == "aggregated":
        if prefill:
            raise ConfError("--prefill-endpoints", o["prefill_endpoints"],
                            "--pd-policy aggregated uses --decode-endpoints only")
    elif not prefill:
        raise ConfError("--prefill-endpoints", o["prefill_endpoints"],
                        f"--pd-policy {pd_policy} needs at least one prefill endpoint")
    for ep in decode:
        if ep.bootstrap_port is not None:
            raise ConfError("--decode-endpoints", o["decode_endpoints"],
                            "@BOOTSTRAP ports belong to prefill endpoints")
    for ep in prefill:
        if ep.bootstrap_port is None:
            continue
        if pd_policy != "parallel":
            raise ConfError("--prefill-endpoints", o["prefill_endpoints"],
                            "@BOOTSTRAP ports are used with --pd-policy parallel only")
        if not ep.is_ip:
            raise ConfError("--prefill-endpoints", o["prefill_endpoints"],
                            f"{ep.host}: write an IP address with @BOOTSTRAP "
                            "(nginx matches bootstrap ports by resolved address)")

    listen_host = parse_listen_host(o["listen_host"])
    listen_port = parse_int("--listen-port", o["listen_port"], 1, 65535)

    ncpu = cpu_count()
    start = parse_int("--start-core-index", o["start_core_index"], 0)
    num = parse_int("--core-num", o["core_num"], 1)
    if start >= ncpu and not allow_missing_cores:
        raise ConfError("--start-core-index", o["start_core_index"],
                        f"this machine has {ncpu} cores (0-{ncpu - 1})")
    if start + num > ncpu and not allow_missing_cores:
        raise ConfError("--core-num", o["core_num"],
                        f"cores {start}-{start + num - 1} requested but this machine "
                        f"has {ncpu} cores (0-{ncpu - 1})")

    model_path = None
    if o["model_path"] is not None:
        model_path = parse_path("--model-path", o["model_path"])
        if not model_path.is_dir():
            raise ConfError("--model-path", o["model_path"], "is not a directory")

    log_file = (parse_path("--log-file", o["log_file"]) if o["log_file"] is not None
                else prefix / "error.log")
    if o["access_log_file"] == "off":
        access_log = None
    elif o["access_log_file"] is not None:
        access_log = parse_path("--access-log-file", o["access_log_file"])
    else:
        access_log = prefix / "access.log"

    module_dir = (parse_path("--module-dir", o["module_dir"]) if o["module_dir"] is not None
                  else paths.module_dir())

    user = o["user"]
    if user is not None and not _USER.match(str(user)):
        raise ConfError("--user", user, "must be a user name")

    return ProxyConf(
        conf_file=conf_file,
        prefix=prefix,
        prefill=prefill,
        decode=decode,
        listen_host=listen_host,
        listen_port=listen_port,
        cores=tuple(range(start, start + num)),
        pd_policy=pd_policy,
        schedule_policy=_choice("--schedule-policy", o["schedule_policy"], SCHEDULE_POLICIES),
        prefill_queue_order=_choice("--prefill-queue-order", o["prefill_queue_order"],
                                    QUEUE_ORDERS),
        model_path=model_path,
        log_file=log_file,
        log_level=_choice("--log-level", o["log_level"], LOG_LEVELS),
        access_log_file=access_log,
        max_batch_num_token=parse_int("--max-batch-num-token", o["max_batch_num_token"], 1),
        prefill_max_num_seqs=parse_int("--prefill-max-num-seqs", o["prefill_max_num_seqs"], 1),
        decode_max_num_seqs=parse_int("--decode-max-num-seqs", o["decode_max_num_seqs"], 1),
        prefill_starvation_timeout_ms=parse_duration(
            "--prefill-starvation-timeout", o["prefill_starvation_timeout"], "ms"),
        queue_max=parse_int("--queue-max", o["queue_max"], 1),
        queue_timeout_ms=parse_duration("--queue-timeout", o["queue_timeout"]),
        decode_max_tokens=parse_int("--decode-max-tokens", o["decode_max_tokens"], 0),
        hold_slack_ms=parse_duration("--hold-slack", o["hold_slack"], "ms"),
        block_size=parse_int("--block-size", o["block_size"], 1),
        index_max_tokens=parse_int("--index-max-tokens", o["index_max_tokens"], 0),
        cache_blocks=parse_int("--cache-blocks", o["cache_blocks"], 0),
        cache_ttl_ms=parse_duration("--cache-ttl", o["cache_ttl"]),
        worker_connections=parse_int("--worker-connections", o["worker_connections"], 32),
        zone_size=parse_size("--zone-size", o["zone_size"], 1 << 20),
        prefill_read_timeout_ms=parse_duration("--prefill-read-timeout",
                                               o["prefill_read_timeout"]),
        decode_read_timeout_ms=parse_duration("--decode-read-timeout",
                                              o["decode_read_timeout"]),
        connect_timeout_ms=parse_duration("--connect-timeout", o["connect_timeout"]),
        keepalive=parse_int("--keepalive", o["keepalive"], 1),
        max_body_size=parse_size("--max-body-size", o["max_body_size"]),
        max_fails=parse_int("--max-fails", o["max_fails"], 0),
        fail_timeout_ms=parse_duration("--fail-timeout", o["fail_timeout"]),
        module_dir=module_dir,
        user=user,
    )


# ---------------------------------------------------------------------------
# rendering


def template_dir() -> Path:
    """templates/ of a source checkout, else the installed package data."""
    here = paths.REPO_ROOT / "templates"
    if (here / "nginx.conf.j2").is_file():
        return here
    import importlib.resources
    return Path(str(importlib.resources.files("omni_ctl.templates")))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["duration"] = format_duration
    return env


def affinity_masks(cores) -> list[str]:
    """worker_cpu_affinity masks, one core per worker, all the same width."""
    width = max(cores) + 1
    return [format(1 << core, f"0{width}b") for core in cores]


def error_pages() -> list[dict]:
    pages = []
    for status, (sent, kind, message) in ERROR_PAGES.items():
        body = ('{"error": {"message": "%s", "type": "%s", "code": %d}}'
                % (message, kind, sent))
        pages.append({"status": status, "sent": sent, "body": body})
    return pages


def render_conf(conf: ProxyConf) -> str:
    """The complete nginx.conf text for a validated ProxyConf."""
    return _environment().get_template("nginx.conf.j2").render(
        version=__version__,
        conf=conf,
        prefix=str(conf.prefix),
        module_path=str(conf.module_path),
        affinity=" ".join(affinity_masks(conf.cores)),
        error_pages=error_pages(),
        default_bootstrap_port=DEFAULT_BOOTSTRAP_PORT,
    )


# ---------------------------------------------------------------------------
# testing and writing


def nginx_test(conf_file, prefix, module_dir=None) -> str:
    """Run `nginx -t` on conf_file (with the sanitizer runtimes preloaded
    when the module is a debug build).  Returns nginx's output; raises
    NginxTestError with it on failure."""
    try:
        binary = paths.nginx_binary()
    except paths.NginxNotFound as exc:
        raise NginxTestError(str(exc)) from None
    os.makedirs(prefix, exist_ok=True)
    argv = [binary, "-t", "-p", str(prefix), "-c", str(conf_file)]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                             env=paths.nginx_env(module_dir), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NginxTestError(f"nginx -t did not finish in 60s: {' '.join(argv)}") from None
    output = (res.stdout + res.stderr).strip()
    if res.returncode != 0:
        raise NginxTestError(f"nginx -t failed for {conf_file}:\n{output}")
    return output


def backup_path(conf_file) -> Path:
    return Path(str(conf_file) + ".prev")


def install_file(path, text: str, backup: bool = True) -> Path | None:
    """Write text to path atomically (temp file + rename in the same
    directory).  The replaced file, when different, becomes path.prev.
    Returns the backup's path when one was made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        made = None
        if backup and path.is_file() and path.read_text() != text:
            bak = backup_path(path)
            os.replace(path, bak)
            made = bak
        os.replace(tmp, path)
        return made
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclasses.dataclass
class Generated:
    conf: ProxyConf
    text: str
    backup: Path | None
    check_output: str | None


def generate(nginx_conf_file, check: bool = False, allow_missing_cores: bool = False,
             **options) -> Generated:
    """gen-conf: validate, render, optionally `nginx -t` the candidate, then
    install it with a backup of the previous file.  Nothing is written when
    validation fails; a candidate that fails the test is removed."""
    conf = make_conf(nginx_conf_file, allow_missing_cores, **options)
    text = render_conf(conf)
    return Generated(conf, text, *install_checked(conf, text, check))


def install_checked(conf: ProxyConf, text: str, check: bool):
    """Install text as conf.conf_file, testing it first with `nginx -t`
    when check is set; returns (backup, nginx output)."""
    dirs = [("--nginx-conf-file", conf.conf_file.parent), ("--prefix", conf.prefix),
            ("--log-file", conf.log_file.parent)]
    if conf.access_log_file:
        dirs.append(("--access-log-file", conf.access_log_file.parent))
    created = []
    for option, d in dirs:
        missing = _missing_parents(d)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _remove_dirs(created)
            raise ConfError(option, d, f"cannot create directory: {exc.strerror}") from None
        created.extend(missing)
    output = None
    if check:
        fd, tmp = tempfile.mkstemp(prefix=f".{conf.conf_file.name}.", suffix=".check",
                                   dir=conf.conf_file.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            output = nginx_test(tmp, conf.prefix, conf.module_dir)
        except NginxTestError:
            # leave no trace of a config that never got installed
            os.unlink(tmp)
            _remove_dirs(created)
            raise
        os.unlink(tmp)
    try:
        backup = install_file(conf.conf_file, text)
    except OSError as exc:
        raise ConfError("--nginx-conf-file", conf.conf_file,
                        f"cannot write: {exc.strerror}") from None
    return backup, output


def _missing_parents(d: Path) -> list[Path]:
    """d and those of its parents that do not exist yet, outermost first."""
    missing = []
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    return missing[::-1]


def _remove_dirs(created: list[Path]) -> None:
    for d in created:
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
