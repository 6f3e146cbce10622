"""Shared fixtures: a real nginx running our module.

Modelled on nginx-tests' Test::Nginx and nginx/unit's test/conftest.py.
Each test renders a config with our own renderer (omni_ctl.conf) into a
temp prefix on free loopback ports, runs `nginx -t`, starts nginx with the
built module (sanitizer runtimes preloaded for a debug build), waits for it
with a deadline, stops it with QUIT, and fails when error.log has [alert],
[emerg] or sanitizer reports.  error.log is printed only when a test fails.

    def test_something(omni_nginx):
        proxy = omni_nginx(pd_policy="aggregated",
                           decode_endpoints=["127.0.0.1:31000"])
        assert proxy.status()["instances"][0]["role"] == "decode"
        resp = proxy.request("POST", "/v1/completions", json={...})

Any gen-conf option can be passed (names as in omni_ctl.conf.DEFAULTS).
Unless given: a free loopback port, 2 workers pinned to cores 0-1 (1 on a
one-core machine), endpoints on free ports nobody listens on, and, when the
tests run as root, `user root` so workers can use the private temp prefix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json as jsonlib
import os
import random
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from omni_ctl import conf as confmod
from omni_ctl import nginxctl, paths

# error.log lines that fail a test
BAD_LOG = re.compile(r"\[(alert|emerg)\]|ERROR: AddressSanitizer|runtime error:"
                     r"|ERROR: LeakSanitizer|Sanitizer:DEADLYSIGNAL")

_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nobody listens on now (never the same one twice in a
    session, so two fixtures cannot be handed one port)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")


_TOKEN_RUN = random.Random().randrange(1 << 30)


class AsyncioEngine:
    """A small HTTP engine on a free loopback port, run by asyncio in a
    thread of its own, for behaviours the simulator cannot be told to have.
    A subclass defines `async def _serve(self, reader, writer)`, called
    for each connection; `with Engine() as engine:` starts and stops it."""

    def __init__(self):
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, reader, writer):
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10), "the engine did not start"
        return self

    async def _stop(self):
        self.server.close()
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.loop.stop()

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop)
        self.thread.join(10)


def random_tokens(n: int, seed) -> list[int]:
    """n token ids, the same for the same seed within one test run (the
    simulator's prefix caches live across tests of a module) and new in
    the next run."""
    rng = random.Random(f"{_TOKEN_RUN}-{seed}")
    return [rng.randrange(1000, 30000) for _ in range(n)]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = ""):
    """Poll predicate until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for "
                                 f"{what or predicate}")
        time.sleep(interval)


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return jsonlib.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class OmniNginx:
    """One nginx running a config rendered by omni_ctl.conf."""

    def __init__(self, prefix: Path, options: dict):
        self.prefix = prefix
        self.options = dict(options)
        self.conf_path = prefix / "nginx.conf"
        self.conf = confmod.make_conf(self.conf_path, **self.options)
        self.allowed: list[re.Pattern] = []
        self.running = False

    # -- addresses

    @property
    def host(self) -> str:
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.conf.listen_host,
                                                         self.conf.listen_host)

    @property
    def port(self) -> int:
        return self.conf.listen_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- lifecycle

    def render(self) -> None:
        """Write the config and run `nginx -t` on it."""
        confmod.install_checked(self.conf, confmod.render_conf(self.conf), check=True)

    def start(self, timeout: float = 15.0) -> None:
        nginxctl.start(self.conf_path, timeout=timeout)
        self.running = True

    def stop(self, timeout: float = 10.0) -> None:
        if self.running:
            self.running = False
            nginxctl.stop(self.conf_path, timeout=timeout)

    def reload(self, timeout: float = 15.0, **changes) -> None:
        """Re-render with the options changed and reload (nginx -t, HUP)."""
        options = {**self.options, **changes}
        new = confmod.make_conf(self.conf_path, **options)
        nginxctl.reload(self.conf_path, new_text=confmod.render_conf(new), timeout=timeout)
        self.options, self.conf = options, new

    @property
    def pid(self) -> int | None:
        return nginxctl.status(self.conf_path).pid

    @property
    def workers(self) -> list[int]:
        return nginxctl.status(self.conf_path).workers

    # -- logs

    @property
    def error_log(self) -> str:
        try:
            return self.conf.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def allow(self, pattern: str) -> None:
        """Do not fail the test on error.log lines matching pattern."""
        self.allowed.append(re.compile(pattern))

    def bad_log_lines(self) -> list[str]:
        return [line for line in self.error_log.splitlines()
                if BAD_LOG.search(line) and not any(p.search(line) for p in self.allowed)]

    # -- HTTP

    def request(self, method: str, path: str, body: bytes | str | None = None,
                json=None, headers: dict | None = None, timeout: float = 30.0) -> Response:
        headers = dict(headers or {})
        if json is not None:
            body = jsonlib.dumps(json)
            headers.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                            resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kwargs) -> Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json=None, **kwargs) -> Response:
        return self.request("POST", path, json=json, **kwargs)

    def status(self) -> dict:
        """GET /omni/status as JSON."""
        resp = self.get("/omni/status", timeout=10)
        assert resp.status == 200, f"/omni/status: {resp.status} {resp.text[:200]}"
        return resp.json()


def default_options(options: dict) -> dict:
    opts = dict(options)
    ncpu = confmod.cpu_count()
    opts.setdefault("listen_port", free_port())
    opts.setdefault("core_num", 2 if ncpu >= 2 else 1)
    opts.setdefault("start_core_index", 0)
    policy = opts.setdefault("pd_policy", "sequential")
    opts.setdefault("decode_endpoints", f"127.0.0.1:{free_port()}")
    if policy != "aggregated":
        opts.setdefault("prefill_endpoints", f"127.0.0.1:{free_port()}")
    if os.geteuid() == 0:
        # pytest's temp dirs are private to root: keep the workers root too
        opts.setdefault("user", "root")
    return opts


@pytest.fixture(scope="session")
def omni_module() -> Path:
    """The built module; fails (not skips) when build.sh has not run."""
    path = paths.module_path()
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `bash build.sh` (or set OMNI_MODULE_DIR)")
    return path


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def omni_nginx(omni_module, tmp_path_factory, request):
    """Factory: omni_nginx(start=True, timeout=15, **gen_conf_options) ->
    OmniNginx, rendered, tested with nginx -t and (by default) started.
    Everything it started is stopped after the test and its error.log
    checked."""
    instances: list[OmniNginx] = []

    def factory(start: bool = True, timeout: float = 15.0, **options) -> OmniNginx:
        prefix = tmp_path_factory.mktemp("nginx")
        inst = OmniNginx(prefix, default_options(options))
        instances.append(inst)
        inst.render()
        if start:
            inst.start(timeout=timeout)
        return inst

    yield factory

    problems = []
    for inst in instances:
        try:
            inst.stop()
        except Exception as exc:  # report every instance, then fail
            problems.append(f"{inst.conf_path}: stop failed: {exc}")
        bad = inst.bad_log_lines()
        if bad:
            problems.append(f"{inst.conf.log_file} has alerts or sanitizer reports:\n"
                            + "\n".join(bad[:20]))
    test_failed = getattr(getattr(request.node, "rep_call", None), "failed", False)
    if test_failed or problems:
        for inst in instances:
            print(f"----- {inst.conf.log_file} -----\n{inst.error_log}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def send_kept(nginx, prompt: str, max_tokens: int):
    """A non-streaming completion as wrk sends it, on a connection the
    caller keeps (and closes to abort it)."""
    import json
    import socket
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens,
                       "stream": False, "temperature": 0}).encode()
    sock = socket.create_connection((nginx.host, nginx.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock
