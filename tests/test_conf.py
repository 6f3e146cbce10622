"""gen-conf as plain functions: parsing, validation, rendering, writing."""

import dataclasses
import re
from pathlib import Path

import pytest

from omni_ctl import conf
from omni_ctl.conf import ConfError, Endpoint


@pytest.fixture(autouse=True)
def eight_cores(monkeypatch):
    monkeypatch.setenv("OMNI_CPU_COUNT", "8")


def make(tmp_path, **options):
    options.setdefault("prefill_endpoints", "127.0.0.1:8001,127.0.0.1:8002")
    options.setdefault("decode_endpoints", "127.0.0.1:9001,127.0.0.1:9002")
    options.setdefault("module_dir", "/opt/omni/modules")
    return conf.make_conf(tmp_path / "nginx.conf", **options)


# -- endpoints


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8001", Endpoint("127.0.0.1", 8001)),
    (" 10.0.0.7:65535 ", Endpoint("10.0.0.7", 65535)),
    ("[::1]:9001", Endpoint("::1", 9001)),
    ("[0:0:0:0:0:0:0:1]:9001", Endpoint("::1", 9001)),
    ("[fe80::1]:1", Endpoint("fe80::1", 1)),
    ("prefill-0.svc.local:8000", Endpoint("prefill-0.svc.local", 8000)),
    ("127.0.0.1:8001@8998", Endpoint("127.0.0.1", 8001, 8998)),
    ("[::1]:8001@9000", Endpoint("::1", 8001, 9000)),
])
def test_parse_endpoint(text, expected):
    assert conf.parse_endpoint("--x", text) == expected


def test_endpoint_address_is_nginx_peer_name():
    assert Endpoint("::1", 9001).address == "[::1]:9001"
    assert Endpoint("127.0.0.1", 9001).address == "127.0.0.1:9001"


@pytest.mark.parametrize("text, reason", [
    ("127.0.0.1", "HOST:PORT"),
    ("127.0.0.1:", "not a number"),
    ("127.0.0.1:0", "out of range"),
    ("127.0.0.1:65536", "out of range"),
    ("127.0.0.1:80a", "not a number"),
    ("300.1.1.1:80", "not an IPv4 address"),
    ("::1:9001", "brackets"),
    ("[::1]9001", r"\[IPv6\]:PORT"),
    ("[::g]:9001", "not an IPv6 address"),
    ("bad_host:80", "not a valid host name"),
    (":80", "HOST:PORT"),
    ("127.0.0.1:8001@0", "bootstrap port 0 is out of range"),
    ("127.0.0.1:8001@x", "bootstrap port 'x' is not a number"),
])
def test_parse_endpoint_errors(text, reason):
    with pytest.raises(ConfError, match=reason) as exc:
        conf.parse_endpoint("--prefill-endpoints", text)
    assert "--prefill-endpoints" in exc.value.message
    assert text.strip() in exc.value.message


def test_parse_endpoints_lists():
    assert conf.parse_endpoints("--x", "") == ()
    assert conf.parse_endpoints("--x", None) == ()
    assert [e.port for e in conf.parse_endpoints("--x", "127.0.0.1:1,127.0.0.1:2")] == [1, 2]
    assert [e.port for e in conf.parse_endpoints("--x", ["127.0.0.1:1", "[::1]:2"])] == [1, 2]
    with pytest.raises(ConfError, match="empty entry"):
        conf.parse_endpoints("--x", "127.0.0.1:1,,127.0.0.1:2")
    with pytest.raises(ConfError, match="lists 127.0.0.1:1 twice"):
        conf.parse_endpoints("--x", "127.0.0.1:1,127.0.0.1:1")
    # the same instance written two ways is still a duplicate
    with pytest.raises(ConfError, match=r"lists \[::1\]:1 twice"):
        conf.parse_endpoints("--x", "[::1]:1,[0::1]:1")


# -- durations, sizes, paths


@pytest.mark.parametrize("text, unit, ms", [
    ("600s", "s", 600_000), ("600", "s", 600_000), ("2000ms", "s", 2000),
    ("2000", "ms", 2000), ("10m", "s", 600_000), ("1h", "s", 3_600_000),
])
def test_parse_duration(text, unit, ms):
    assert conf.parse_duration("--t", text, unit) == ms


@pytest.mark.parametrize("text", ["", "1.5s", "-1s", "10 s", "1d", "0s", "s"])
def test_parse_duration_errors(text):
    with pytest.raises(ConfError, match="--t"):
        conf.parse_duration("--t", text)


def test_format_duration():
    assert conf.format_duration(600_000) == "600s"
    assert conf.format_duration(2500) == "2500ms"


def test_parse_size():
    assert conf.parse_size("--s", "64m") == "64m"
    assert conf.parse_size("--s", "64M") == "64m"
    assert conf.parse_size("--s", "4096") == "4096"
    assert conf.parse_size("--s", "0") == "0"
    for bad in ("64mb", "1.5m", "-1", ""):
        with pytest.raises(ConfError, match="--s"):
            conf.parse_size("--s", bad)
    with pytest.raises(ConfError, match="at least 1024k"):
        conf.parse_size("--zone-size", "512k", 1 << 20)


@pytest.mark.parametrize("bad", ["/tmp/a b", "/tmp/a;b", "/tmp/$x", "/tmp/a{", "/tmp/'q'",
                                 "/tmp/#x", ""])
def test_parse_path_rejects_what_nginx_would_misread(bad):
    with pytest.raises(ConfError, match="--log-file"):
        conf.parse_path("--log-file", bad)


def test_parse_path_makes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert conf.parse_path("--p", "x/../y.conf") == tmp_path / "y.conf"


# -- the whole option set


def test_defaults(tmp_path):
    c = make(tmp_path)
    assert c.prefix == tmp_path
    assert c.log_file == tmp_path / "error.log"
    assert c.access_log_file == tmp_path / "access.log"
    assert c.pid_file == tmp_path / "nginx.pid"
    assert c.cores == (0,)
    assert (c.pd_policy, c.schedule_policy, c.prefill_queue_order) == \
        ("sequential", "omni", "sjf")
    assert c.listen == "127.0.0.1:8080"
    assert c.prefill_starvation_timeout_ms == 5000
    assert c.module_path == Path("/opt/omni/modules/ngx_http_omni_module.so")


def test_module_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI_MODULE_DIR", str(tmp_path / "mods"))
    c = make(tmp_path, module_dir=None)
    assert c.module_dir == tmp_path / "mods"


@pytest.mark.parametrize("options, option, value", [
    (dict(listen_port=0), "--listen-port", "0"),
    (dict(listen_port=65536), "--listen-port", "65536"),
    (dict(listen_port="http"), "--listen-port", "http"),
    (dict(listen_host="localhost"), "--listen-host", "localhost"),
    (dict(pd_policy="both"), "--pd-policy", "both"),
    (dict(schedule_policy="random"), "--schedule-policy", "random"),
    (dict(prefill_queue_order="lifo"), "--prefill-queue-order", "lifo"),
    (dict(log_level="verbose"), "--log-level", "verbose"),
    (dict(core_num=0), "--core-num", "0"),
    (dict(core_num=9), "--core-num", "9"),
    (dict(start_core_index=8), "--start-core-index", "8"),
    (dict(start_core_index=-1), "--start-core-index", "-1"),
    (dict(start_core_index=6, core_num=3), "--core-num", "3"),
    (dict(prefill_endpoints=""), "--prefill-endpoints", ""),
    (dict(decode_endpoints=""), "--decode-endpoints", ""),
    (dict(pd_policy="aggregated"), "--prefill-endpoints", "127.0.0.1:8001,127.0.0.1:8002"),
    (dict(prefill_endpoints="127.0.0.1:8001@9000"), "--prefill-endpoints",
     "127.0.0.1:8001@9000"),
    (dict(decode_endpoints="127.0.0.1:9001@9000", pd_policy="parallel"),
     "--decode-endpoints", "127.0.0.1:9001@9000"),
    (dict(prefill_endpoints="p0.local:8001@9000", pd_policy="parallel"),
     "--prefill-endpoints", "p0.local:8001@9000"),
    (dict(model_path="/nonexistent/model"), "--model-path", "/nonexistent/model"),
    (dict(max_batch_num_token=0), "--max-batch-num-token", "0"),
    (dict(prefill_max_num_seqs=0), "--prefill-max-num-seqs", "0"),
    (dict(decode_max_num_seqs=-3), "--decode-max-num-seqs", "-3"),
    (dict(prefill_starvation_timeout="soon"), "--prefill-starvation-timeout", "soon"),
    (dict(queue_max=0), "--queue-max", "0"),
    (dict(queue_timeout="0s"), "--queue-timeout", "0s"),
    (dict(worker_connections=8), "--worker-connections", "8"),
    (dict(zone_size="64"), "--zone-size", "64"),
    (dict(prefill_read_timeout="forever"), "--prefill-read-timeout", "forever"),
    (dict(decode_read_timeout="1.5s"), "--decode-read-timeout", "1.5s"),
    (dict(connect_timeout="0"), "--connect-timeout", "0"),
    (dict(keepalive=0), "--keepalive", "0"),
    (dict(max_body_size="1 m"), "--max-body-size", "1 m"),
    (dict(max_fails=-1), "--max-fails", "-1"),
    (dict(fail_timeout="x"), "--fail-timeout", "x"),
    (dict(user="root;"), "--user", "root;"),
    (dict(log_file="/tmp/with space.log"), "--log-file", "/tmp/with space.log"),
    (dict(engine_routes="/v1/models,v1/x"), "--engine-routes", "/v1/models,v1/x"),
    (dict(engine_routes="/v1/completions"), "--engine-routes", "/v1/completions"),
    (dict(engine_routes="/_omni/decode/x"), "--engine-routes", "/_omni/decode/x"),
    (dict(engine_routes="/a;b"), "--engine-routes", "/a;b"),
    (dict(engine_routes="/a,/a"), "--engine-routes", "/a,/a"),
    (dict(status_allow="localhost"), "--status-allow", "localhost"),
    (dict(status_allow=""), "--status-allow", ""),
    (dict(api_key="two words"), "--api-key", "***"),
    (dict(api_key="k", api_key_file="/etc/hostname"), "--api-key", "***"),
    (dict(status_token="t\u00e9"), "--status-token", "***"),
    (dict(status_token_file="/nonexistent/token"), "--status-token-file",
     "/nonexistent/token"),
])
def test_bad_option(tmp_path, options, option, value):
    with pytest.raises(ConfError) as exc:
        make(tmp_path, **options)
    assert exc.value.option == option
    assert f"{option} {value!r}" in exc.value.message
    assert list(tmp_path.iterdir()) == []


def test_core_error_says_how_many_cores(tmp_path):
    with pytest.raises(ConfError, match=r"this machine has 8 cores \(0-7\)"):
        make(tmp_path, start_core_index=4, core_num=5)


def test_allow_missing_cores(tmp_path):
    c = conf.make_conf(tmp_path / "nginx.conf", allow_missing_cores=True,
                       prefill_endpoints="127.0.0.1:1", decode_endpoints="127.0.0.1:2",
                       start_core_index=10, core_num=2)
    assert c.cores == (10, 11)


def test_unknown_python_option_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="listen_prot"):
        make(tmp_path, listen_prot=1)


def test_aggregated_needs_decode_only(tmp_path):
    c = make(tmp_path, pd_policy="aggregated", prefill_endpoints="")
    assert c.prefill == () and len(c.decode) == 2


def test_model_path_must_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfError, match="is not a directory"):
        make(tmp_path, model_path=str(tmp_path / "file"))
    assert make(tmp_path, model_path=str(tmp_path)).model_path == tmp_path


def test_affinity_masks():
    assert conf.affinity_masks([0]) == ["1"]
    assert conf.affinity_masks([0, 1]) == ["01", "10"]
    assert conf.affinity_masks([2, 3]) == ["0100", "1000"]


# -- the option table


def test_option_table_is_the_one_source():
    from omni_ctl import conf_cli
    names = [o.name for o in conf.OPTIONS]
    assert len(names) == len(set(names))
    assert list(conf.DEFAULTS) == names
    assert [d[0] for d, _ in conf_cli.CONF_OPTIONS] == [o.flag for o in conf.OPTIONS]
    fields = {f.name for f in dataclasses.fields(conf.ProxyConf)}
    for opt in conf.OPTIONS:
        if opt.kind != "special":
            assert opt.field in fields, opt.name
            conf.parse_option(opt, opt.default)      # every default is valid
        assert opt.section in conf.SECTIONS, opt.name
        assert opt.directive is None or opt.directive.startswith("omni_")


def test_every_omni_directive_is_rendered_from_the_table(tmp_path):
    text = conf.render_conf(make(tmp_path, model_path=str(tmp_path)))
    http_level = re.findall(r"^    (omni_\w+) ", text, re.M)
    assert http_level == [o.directive for o in conf.OPTIONS if o.directive]
    expected = conf.directive_defaults()
    assert directives(text, "omni_zone_size") == ["64m"]
    assert expected["zone_size"] == 64 << 20
    assert expected["queue_timeout_ms"] == 600_000 and expected["block_size"] == 256


# -- rendering


def directives(text, name):
    return [m.group(1) for m in re.finditer(rf"^\s*{name}\s+([^;]*);", text, re.M)]


def block(text, header):
    """The text of the block that starts with header (braces balanced)."""
    start = text.index(header)
    depth = 0
    for i in range(text.index("{", start), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    raise AssertionError("unbalanced")


def test_render_sequential(tmp_path):
    text = conf.render_conf(make(tmp_path, core_num=2, start_core_index=2))
    assert directives(text, "load_module") == ["/opt/omni/modules/ngx_http_omni_module.so"]
    assert directives(text, "worker_processes") == ["2"]
    assert directives(text, "worker_cpu_affinity") == ["0100 1000"]
    assert directives(text, "omni_pd_policy") == ["sequential"]
    assert directives(text, "omni_model_path") == []
    up = block(text, "upstream omni_prefill")
    lines = [line.strip() for line in up.splitlines()]
    assert lines.index("omni_balance prefill;") < lines.index("keepalive 256;")
    assert "server 127.0.0.1:8001 max_fails=3 fail_timeout=10s;" in lines
    assert "omni_bootstrap" not in up
    assert "location /_omni/prefill/" in text
    assert "location /_omni/decode/" in text
    listen = directives(text, "listen")
    assert listen == ["127.0.0.1:8080 reuseport backlog=4096"]


def test_render_parallel_bootstrap(tmp_path):
    text = conf.render_conf(make(
        tmp_path, pd_policy="parallel",
        prefill_endpoints="127.0.0.1:8001@9001,[::1]:8002,p2.local:8003"))
    up = block(text, "upstream omni_prefill")
    assert directives(up, "omni_bootstrap") == ["127.0.0.1:8001 9001", "[::1]:8002 8998"]
    assert up.index("omni_bootstrap") < up.index("keepalive 256;")


def test_render_aggregated_has_no_prefill(tmp_path):
    text = conf.render_conf(make(tmp_path, pd_policy="aggregated", prefill_endpoints=""))
    assert "upstream omni_prefill" not in text
    assert "http://omni_prefill" not in text
    assert "/_omni/prefill" not in text
    assert "upstream omni_decode" in text


def test_render_options(tmp_path):
    c = make(tmp_path, model_path=str(tmp_path), listen_host="::", listen_port=9000,
             access_log_file="off", log_level="info", schedule_policy="round-robin",
             prefill_queue_order="fcfs", prefill_starvation_timeout="3s", zone_size="128m",
             decode_read_timeout="1h", prefill_read_timeout="90", connect_timeout="500ms",
             keepalive=32, max_body_size="1m", max_fails=0, fail_timeout="30s",
             worker_connections=1024, user="root", queue_max=10, queue_timeout="5m")
    text = conf.render_conf(c)
    assert directives(text, "omni_model_path") == [str(tmp_path)]
    assert directives(text, "listen") == ["[::]:9000 reuseport backlog=4096"]
    assert directives(text, "access_log") == ["off"]
    assert directives(text, "error_log") == [f"{tmp_path}/error.log info"]
    assert directives(text, "omni_schedule_policy") == ["round-robin"]
    assert directives(text, "omni_prefill_queue_order") == ["fcfs"]
    assert directives(text, "omni_prefill_starvation_timeout") == ["3s"]
    assert directives(text, "omni_zone_size") == ["128m"]
    assert directives(text, "omni_queue_max") == ["10"]
    assert directives(text, "omni_queue_timeout") == ["300s"]
    assert directives(text, "worker_connections") == ["1024"]
    assert directives(text, "user") == ["root"]
    # the http level's, then /omni/ingest's own (the agent's batches)
    assert directives(text, "client_max_body_size") == ["1m", "4m"]
    assert "server 127.0.0.1:9001 max_fails=0 fail_timeout=30s;" in text
    # prefill, decode and (with a model path) the tokenizer's upstream
    assert directives(text, "keepalive") == ["32", "32", "32"]
    decode = block(text, "location /_omni/decode/")
    assert directives(decode, "proxy_read_timeout") == ["3600s"]
    assert directives(decode, "proxy_connect_timeout") == ["500ms"]
    assert directives(decode, "proxy_buffering") == ["off"]
    prefill = block(text, "location /_omni/prefill/")
    assert directives(prefill, "proxy_read_timeout") == ["90s"]
    assert directives(prefill, "proxy_buffering") == ["on"]


def test_every_path_is_inside_the_prefix(tmp_path):
    text = conf.render_conf(make(tmp_path))
    for name in ("pid", "error_log", "access_log", "client_body_temp_path", "proxy_temp_path",
                 "fastcgi_temp_path", "uwsgi_temp_path", "scgi_temp_path"):
        values = directives(text, name)
        assert values, name
        for value in values:
            assert value.startswith(f"{tmp_path}/"), (name, value)


def test_status_and_metrics_are_loopback_only(tmp_path):
    text = conf.render_conf(make(tmp_path))
    for loc in ("location = /omni/status", "location = /metrics"):
        body = block(text, loc)
        assert directives(body, "allow") == ["127.0.0.1", "::1"]
        assert directives(body, "deny") == ["all"]
        assert directives(body, "omni_api_key_file") == []


def test_status_allow_and_token(tmp_path):
    c = make(tmp_path, status_allow="10.1.2.3, 10.0.0.0/8,::1", status_token="s3cret")
    text = conf.render_conf(c)
    for loc in ("location = /omni/status", "location = /metrics"):
        body = block(text, loc)
        assert directives(body, "allow") == ["10.1.2.3", "10.0.0.0/8", "::1"]
        assert directives(body, "deny") == ["all"]
        assert directives(body, "omni_api_key_file") == [f"{tmp_path}/status_token"]
    assert "s3cret" not in text and "s3cret" not in repr(c)
    body = block(conf.render_conf(make(tmp_path, status_allow="all")), "location = /metrics")
    assert directives(body, "allow") == [] and directives(body, "deny") == []


def test_front_door_locations(tmp_path):
    """Only the scheduled routes, the proxy's pages and the listed engine
    routes have a location; everything else is the 404 of `location /`."""
    text = conf.render_conf(make(tmp_path, engine_routes="/v1/models,/get_model_info"))
    assert directives(block(text, "location / "), "return") == ["404"]
    assert "proxy_pass" not in block(text, "location / ")
    for route in ("/v1/completions", "/v1/chat/completions"):
        body = block(text, f"location = {route} ")
        assert directives(body, "omni_methods") == ["POST"]
        assert directives(body, "omni_api_key_file") == []
    for route in ("/v1/models", "/get_model_info"):
        body = block(text, f"location = {route} ")
        assert directives(body, "omni_methods") == ["GET HEAD"]
        assert directives(body, "proxy_pass") == ["http://omni_decode"]
    # the only locations that reach an engine: the two legs and the routes
    passes = re.findall(r"location ([^{]*)\{[^}]*proxy_pass", text)
    assert sorted(p.strip() for p in passes) == [
        "/_omni/decode/", "/_omni/prefill/", "= /get_model_info", "= /v1/models"]
    text = conf.render_conf(make(tmp_path, engine_routes="none"))
    assert re.findall(r"location = (\S+) \{[^}]*proxy_pass", text) == []


def test_api_key_goes_to_a_private_file(tmp_path):
    import stat
    c = make(tmp_path, api_key="sk-test-1", core_num=1)
    text = conf.render_conf(c)
    assert "sk-test-1" not in text
    for route in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/version"):
        body = block(text, f"location = {route} ")
        assert directives(body, "omni_api_key_file") == [f"{tmp_path}/api_key"]
    for loc in ("location = /health", "location = /omni/status"):
        assert "omni_api_key" not in block(text, loc)
    conf.install_checked(c, text, check=False)
    key = tmp_path / "api_key"
    assert key.read_text() == "sk-test-1\n"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(c.conf_file.stat().st_mode) == 0o644
    keyfile = tmp_path / "given_key"
    keyfile.write_text("k\n")
    c = make(tmp_path, api_key_file=str(keyfile))
    assert c.api_key_path == keyfile and c.secrets() == {}


def test_log_format_uses_every_module_variable(tmp_path):
    text = conf.render_conf(make(tmp_path))
    fmt = text[text.index("log_format omni"):text.index(";", text.index("log_format omni"))]
    for var in ("omni_request_id", "omni_pd_mode", "omni_prefill_addr", "omni_decode_addr",
                "omni_prompt_tokens", "omni_queue_ms", "omni_prefill_ms", "omni_ttft_ms",
                "omni_total_ms", "omni_error"):
        assert f"${var}" in fmt


def test_error_pages_are_openai_json(tmp_path):
    import json
    text = conf.render_conf(make(tmp_path))
    for status, (sent, kind, _) in conf.ERROR_PAGES.items():
        assert re.search(rf"error_page {status} (={sent} )?/_omni/error/{status};", text)
        loc = block(text, f"location = /_omni/error/{status} ")
        assert directives(loc, "internal") == [] and "internal;" in loc
        m = re.search(r"return (\d+) '(.*)\\n';", loc)
        assert int(m.group(1)) == sent
        body = json.loads(m.group(2))
        assert body["error"]["code"] == sent and body["error"]["type"] == kind
    # 494 (header too large) is sent as a plain 400
    assert "error_page 494 =400 /_omni/error/494;" in text


def test_template_environment_is_strict():
    import jinja2
    env = conf._environment()
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ conf.no_such_option }}").render(conf=object())
    assert env.from_string("a\n").render() == "a\n"       # keep_trailing_newline
    assert env.trim_blocks and env.lstrip_blocks


# -- writing


def test_install_file_is_atomic_and_keeps_one_backup(tmp_path):
    path = tmp_path / "sub" / "nginx.conf"
    assert conf.install_file(path, "one\n") is None
    assert path.read_text() == "one\n"
    assert conf.install_file(path, "one\n") is None          # unchanged: no backup
    assert conf.install_file(path, "two\n") == tmp_path / "sub" / "nginx.conf.prev"
    assert (tmp_path / "sub" / "nginx.conf.prev").read_text() == "one\n"
    conf.install_file(path, "three\n")
    assert (tmp_path / "sub" / "nginx.conf.prev").read_text() == "two\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["nginx.conf", "nginx.conf.prev"]


def test_generate_writes_after_validation_only(tmp_path):
    with pytest.raises(ConfError):
        conf.generate(tmp_path / "a" / "nginx.conf", prefill_endpoints="127.0.0.1:1",
                      decode_endpoints="127.0.0.1:0")
    assert list(tmp_path.iterdir()) == []
    result = conf.generate(tmp_path / "a" / "nginx.conf", prefill_endpoints="127.0.0.1:1",
                           decode_endpoints="127.0.0.1:2", module_dir="/opt/m")
    assert (tmp_path / "a" / "nginx.conf").read_text() == result.text
    assert result.backup is None and result.check_output is None
