"""The front door, through a real nginx with our module: only the routes the
proxy schedules and the listed read-only engine routes reach an engine;
admin paths never do; status and metrics answer only where configured; an
API key and a status token are one option away.

The engines are small aiohttp servers in a thread that record every request
they receive (method, path, Authorization) and answer anything with a
completion: a path reaching them shows up in the record whatever it is, so
"never reached an engine" is read from what they saw, not from the status
the proxy sent.
"""

import asyncio
import http.client
import json
import os
import pwd
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from aiohttp import web

from conftest import OmniNginx, default_options
from omni_ctl import conf as confmod

pytestmark = pytest.mark.timeout(180)

COMPLETION = {"id": "cmpl-1", "object": "text_completion", "model": "m",
              "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class RecordingEngine:
    """Answers every method and path with a completion, recording each."""

    def __init__(self):
        self.seen: list[tuple[str, str, str | None]] = []
        self.loop = asyncio.new_event_loop()
        self.port = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10), "recording engine did not start"
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def paths(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.seen]

    def _serve(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def handle(self, request):
        await request.read()
        self.seen.append((request.method, request.path_qs,
                          request.headers.get("Authorization")))
        return web.json_response(COMPLETION)


@pytest.fixture
def engines():
    with RecordingEngine() as prefill, RecordingEngine() as decode:
        yield prefill, decode


def _proxy(omni_nginx, engines, pd_policy="aggregated", **options):
    prefill, decode = engines
    if pd_policy != "aggregated":
        options.setdefault("prefill_endpoints", prefill.endpoint)
    return omni_nginx(pd_policy=pd_policy, decode_endpoints=decode.endpoint, **options)


def _seen(engines):
    return [seen for engine in engines for seen in engine.paths()]


def _json_error(resp, status, kind=None):
    assert resp.status == status, (resp.status, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    err = resp.json()["error"]
    assert err["code"] == status and err["message"]
    if kind:
        assert err["type"] == kind
    return err


PROMPT = {"model": "m", "prompt": "hello", "max_tokens": 1}

# (method, path) a client may try; none of them may reach an engine
HOSTILE = [
    ("POST", "/flush_cache"), ("GET", "/flush_cache"), ("POST", "/sleep"),
    ("POST", "/sleep?level=1"), ("POST", "/wake_up"), ("POST", "/reset_prefix_cache"),
    ("POST", "/update_weights_from_disk"), ("POST", "/update_weights"),
    ("POST", "/start_profile"), ("POST", "/stop_profile"),
    ("POST", "/load_lora_adapter"), ("POST", "/unload_lora_adapter"),
    ("POST", "/sim/fault"), ("GET", "/sim/state"), ("POST", "/abort_request"),
    ("GET", "/get_server_info"), ("POST", "/v1/completions/"),
    ("POST", "/v1/chat/completions/"), ("POST", "/v1/completions/x"),
    ("POST", "/v1/completions.json"), ("POST", "/v1//completions/"),
    ("POST", "/v1/../flush_cache"), ("POST", "/%66lush_cache"), ("GET", "/"),
    ("GET", "/v1/models/"), ("GET", "/v1"), ("POST", "/v1/embeddings"),
    ("GET", "/_omni/decode/v1/completions"), ("POST", "/_omni/prefill/v1/completions"),
]

# a known route with another method: 405 and the methods it takes
WRONG_METHOD = [
    ("GET", "/v1/completions", "POST"), ("PUT", "/v1/chat/completions", "POST"),
    ("DELETE", "/v1/completions", "POST"), ("POST", "/v1/models", "GET, HEAD"),
    ("DELETE", "/version", "GET, HEAD"), ("POST", "/omni/status", "GET, HEAD"),
    ("POST", "/health", "GET, HEAD"),
]


@pytest.mark.parametrize("pd_policy", ["aggregated", "sequential"])
def test_admin_paths_never_reach_an_engine(omni_nginx, engines, pd_policy):
    proxy = _proxy(omni_nginx, engines, pd_policy)
    for method, path in HOSTILE:
        resp = proxy.request(method, path, json=PROMPT if method == "POST" else None)
        _json_error(resp, 404, "invalid_request_error")
    for method, path, allow in WRONG_METHOD:
        resp = proxy.request(method, path, json=PROMPT if method != "GET" else None)
        err = _json_error(resp, 405, "invalid_request_error")
        assert resp.headers["allow"] == allow
        assert method in err["message"]
    resp = proxy.request("HEAD", "/v1/completions")
    assert resp.status == 405 and resp.headers["allow"] == "POST" and resp.body == b""
    assert _seen(engines) == []
    # the same engines do receive what the front door lets through
    assert proxy.post("/v1/completions", json=PROMPT).status == 200
    assert proxy.get("/v1/models").status == 200
    assert proxy.request("HEAD", "/version").status == 200
    seen = _seen(engines)
    assert ("GET", "/v1/models") in seen and ("HEAD", "/version") in seen
    assert ("POST", "/v1/completions") in seen
    assert {p for _, p in seen} == {"/v1/models", "/version", "/v1/completions"}


def test_engine_routes_are_configurable(omni_nginx, engines):
    proxy = _proxy(omni_nginx, engines, engine_routes="/get_model_info")
    _json_error(proxy.get("/v1/models"), 404)
    assert proxy.get("/get_model_info").status == 200
    assert _seen(engines) == [("GET", "/get_model_info")]


def _get_from(proxy, source: str, path: str, headers=None):
    """GET path with the client socket bound to source."""
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=30,
                                      source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_status_and_metrics_refused_from_another_address(omni_nginx, engines):
    proxy = _proxy(omni_nginx, engines, status_allow="127.0.0.1")
    for path in ("/omni/status", "/metrics"):
        status, body = _get_from(proxy, "127.0.0.2", path)
        assert status == 403, (path, status, body)
        assert json.loads(body)["error"]["code"] == 403
        status, _ = _get_from(proxy, "127.0.0.1", path)
        assert status == 200, path
    # the API itself is not restricted by --status-allow
    status, _ = _get_from(proxy, "127.0.0.2", "/health")
    assert status == 200


def test_status_allow_a_network(omni_nginx, engines):
    proxy = _proxy(omni_nginx, engines, status_allow="127.0.0.0/30")
    assert _get_from(proxy, "127.0.0.2", "/metrics")[0] == 200
    assert _get_from(proxy, "127.0.0.5", "/metrics")[0] == 403


def test_status_token(omni_nginx, engines):
    proxy = _proxy(omni_nginx, engines, status_token="st-9f8e7d")
    for path in ("/omni/status", "/metrics"):
        resp = proxy.get(path)
        _json_error(resp, 401, "authentication_error")
        assert resp.headers["www-authenticate"].startswith("Bearer")
        _json_error(proxy.get(path, headers={"Authorization": "Bearer st-9f8e7e"}), 401)
        assert proxy.get(path, headers={"Authorization": "Bearer st-9f8e7d"}).status == 200
    # the token guards status and metrics only
    assert proxy.post("/v1/completions", json=PROMPT).status == 200


KEY = "sk-front-door-0123456789"


@pytest.mark.parametrize("pd_policy", ["aggregated", "sequential"])
def test_api_key_required(omni_nginx, engines, pd_policy):
    proxy = _proxy(omni_nginx, engines, pd_policy, api_key=KEY)
    wrong = [None, "", "Bearer", "Bearer ", f"Basic {KEY}", f"Bearer {KEY[:-1]}",
             f"Bearer {KEY}x", f"Bearer {KEY[:-1]}X", "Bearer sk", f"Bearer  {KEY} x"]
    for auth in wrong:
        headers = {} if auth is None else {"Authorization": auth}
        for path in ("/v1/completions", "/v1/chat/completions"):
            resp = proxy.post(path, json=PROMPT, headers=headers)
            _json_error(resp, 401, "authentication_error")
            assert resp.headers["www-authenticate"].startswith('Bearer realm="omni"')
        _json_error(proxy.get("/v1/models", headers=headers), 401)
    assert _seen(engines) == []
    ok = {"Authorization": f"Bearer {KEY}"}
    assert proxy.post("/v1/completions", json=PROMPT, headers=ok).status == 200
    assert proxy.post("/v1/completions", json=PROMPT,
                      headers={"Authorization": f"bearer {KEY}"}).status == 200
    assert proxy.get("/v1/models", headers=ok).status == 200
    assert ("POST", "/v1/completions") in _seen(engines)
    # readiness stays open; the proxy's pages keep their own rules
    assert proxy.get("/health").status == 200
    assert proxy.get("/omni/status").status == 200
    assert proxy.status()["totals"]["inflight_requests"] == 0


def test_api_key_file(omni_nginx, engines, tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "\n")
    proxy = _proxy(omni_nginx, engines, api_key_file=str(keyfile))
    assert KEY not in proxy.conf_path.read_text()
    _json_error(proxy.post("/v1/completions", json=PROMPT), 401)
    assert proxy.post("/v1/completions", json=PROMPT,
                      headers={"Authorization": f"Bearer {KEY}"}).status == 200


@pytest.mark.parametrize("text, message", [
    ("\n", "the key is empty"),
    ("two words\n", "printable ASCII"),
    ("x" * 5000, "not a key file"),
])
def test_bad_key_file_fails_nginx_t(omni_nginx, engines, tmp_path, text, message):
    keyfile = tmp_path / "key"
    keyfile.write_text(text)
    with pytest.raises(confmod.NginxTestError, match=message):
        _proxy(omni_nginx, engines, api_key_file=str(keyfile))


@pytest.mark.skipif(os.geteuid() != 0, reason="workers change user only under a root master")
def test_workers_run_unprivileged_by_default(omni_module, engines):
    """No --user: the master is root, the workers are nginx's unprivileged
    user, and they can still use the temp directories in the prefix (a
    body larger than client_body_buffer_size goes through one)."""
    prefix = Path(tempfile.mkdtemp(prefix="omni-user-"))
    os.chmod(prefix, 0o755)                 # searchable, as a real prefix is
    options = default_options(dict(pd_policy="aggregated",
                                   decode_endpoints=engines[1].endpoint, user=None))
    proxy = OmniNginx(prefix, options)
    try:
        assert confmod.unreachable_dir(proxy.conf) is None
        proxy.render()
        proxy.start()
        nobody = pwd.getpwnam("nobody").pw_uid
        for pid in proxy.workers:
            uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:4]
            assert {int(u) for u in uids} == {nobody}, (pid, uids)
        big = dict(PROMPT, prompt="x" * (3 << 20))
        assert proxy.post("/v1/completions", json=big, timeout=60).status == 200
        assert ("POST", "/v1/completions") in _seen(engines)
        assert "buffered to a temporary file" in proxy.error_log
    finally:
        proxy.stop()
        bad = proxy.bad_log_lines() + [line for line in proxy.error_log.splitlines()
                                       if "[crit]" in line]
        shutil.rmtree(prefix, ignore_errors=True)
    assert bad == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root master changes the workers' user")
def test_private_prefix_is_reported(tmp_path):
    """pytest's temp dirs are private to root: the default worker user
    could not enter them, and gen-conf says so."""
    c = confmod.make_conf(tmp_path / "nginx.conf", decode_endpoints="127.0.0.1:1",
                          pd_policy="aggregated", core_num=1)
    blocked = confmod.unreachable_dir(c)
    assert blocked is not None and tmp_path.is_relative_to(blocked)
    assert confmod.unreachable_dir(
        confmod.make_conf(tmp_path / "nginx.conf", decode_endpoints="127.0.0.1:1",
                          pd_policy="aggregated", core_num=1, user="root")) is None


def test_reload_adds_an_api_key(omni_nginx, engines):
    """`omni-ctl reload` with --api-key writes the key file before it tests
    and reloads the new config."""
    from click.testing import CliRunner
    from omni_ctl.cli import main
    proxy = _proxy(omni_nginx, engines)
    assert proxy.post("/v1/completions", json=PROMPT).status == 200
    args = ["reload", "--nginx-conf-file", str(proxy.conf_path), "--api-key", KEY]
    for name, value in proxy.options.items():
        args += [confmod.OPTION[name].flag, str(value)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    _json_error(proxy.post("/v1/completions", json=PROMPT), 401)
    assert proxy.post("/v1/completions", json=PROMPT,
                      headers={"Authorization": f"Bearer {KEY}"}).status == 200
