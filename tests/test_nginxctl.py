"""start/stop/reload/status against real nginx with our module, and the
guarantee that no other nginx on the machine is ever signalled."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import free_port, wait_until
from omni_ctl import conf, nginxctl, paths

ROOT_USER = ["--user", "root"] if os.geteuid() == 0 else []


def omni_ctl(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "omni_ctl.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def render(prefix, port, *extra):
    conf_file = prefix / "nginx.conf"
    res = omni_ctl("gen-conf", "--nginx-conf-file", str(conf_file),
                   "--listen-port", str(port), "--core-num", "1",
                   "--prefill-endpoints", f"127.0.0.1:{free_port()}",
                   "--decode-endpoints", f"127.0.0.1:{free_port()}", *ROOT_USER, *extra)
    assert res.returncode == 0, res.stderr
    return conf_file


@pytest.fixture
def managed(omni_module, tmp_path):
    """A config file whose nginx is stopped after the test whatever happens."""
    conf_files = []

    def make(*extra):
        port = free_port()
        conf_file = render(tmp_path / f"p{len(conf_files)}", port, *extra)
        conf_files.append(conf_file)
        return conf_file, port

    yield make
    for conf_file in conf_files:
        nginxctl.stop(conf_file)
        bad = nginxctl.bad_log_lines((conf_file.parent / "error.log").read_text()
                                     if (conf_file.parent / "error.log").exists() else "")
        assert not bad, bad


@pytest.fixture
def other_nginx(tmp_path):
    """An unrelated nginx (no module, its own prefix), run as our child."""
    prefix = tmp_path / "other"
    prefix.mkdir()
    port = free_port()
    (prefix / "nginx.conf").write_text(textwrap.dedent(f"""\
        daemon off;
        worker_processes 1;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log;
        events {{ }}
        http {{
            access_log off;
            client_body_temp_path {prefix}/body;
            proxy_temp_path {prefix}/proxy;
            fastcgi_temp_path {prefix}/fastcgi;
            uwsgi_temp_path {prefix}/uwsgi;
            scgi_temp_path {prefix}/scgi;
            server {{
                listen 127.0.0.1:{port};
                location / {{ return 200 "other\\n"; }}
            }}
        }}
        """))
    proc = subprocess.Popen([paths.nginx_binary(), "-p", str(prefix), "-c",
                             str(prefix / "nginx.conf")], stdin=subprocess.DEVNULL)
    proc.port = port
    wait_until(lambda: nginxctl.http_ready("127.0.0.1", port), 10, what="other nginx")
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(10)


def other_answers(proc) -> bool:
    return proc.poll() is None and nginxctl.http_ready("127.0.0.1", proc.port)


# -- the fixture other tests build on


def test_fixture_serves_status_metrics_health(omni_nginx):
    proxy = omni_nginx()
    st = proxy.status()
    assert [i["role"] for i in st["instances"]] == ["prefill", "decode"]
    assert st["pd_policy"] == "sequential"
    assert len(proxy.workers) == len(proxy.conf.cores)
    metrics = proxy.get("/metrics")
    assert metrics.status == 200 and "omni_" in metrics.text
    assert proxy.get("/health").status in (200, 503)


@pytest.mark.parametrize("policy", ["sequential", "parallel", "aggregated"])
def test_fixture_policies(omni_nginx, policy):
    proxy = omni_nginx(pd_policy=policy, schedule_policy="round-robin",
                       prefill_queue_order="fcfs")
    st = proxy.status()
    assert st["pd_policy"] == policy
    roles = [i["role"] for i in st["instances"]]
    assert roles == (["decode"] if policy == "aggregated" else ["prefill", "decode"])


def raw_request(proxy, data: bytes) -> tuple[int, dict, bytes]:
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def assert_json_error(status, headers, body, expected):
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] == expected and isinstance(err["type"], str)


def test_nginx_errors_are_openai_json(omni_nginx):
    proxy = omni_nginx(max_body_size="1k")
    proxy.allow(r"client intended to send too large body")
    # decode tier down: nginx's own 502 for a plainly proxied path
    r = proxy.get("/v1/models")
    assert_json_error(r.status, r.headers, r.body, 502)
    assert_json_error(*raw_request(proxy, b"GARBAGE\r\n\r\n"), 400)
    assert_json_error(*raw_request(proxy, b"TRACE / HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n"), 405)
    long_uri = b"/" + b"a" * 20000
    assert_json_error(*raw_request(proxy, b"GET " + long_uri + b" HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n"), 414)
    big_header = b"X-Big: " + b"b" * 20000 + b"\r\n"
    assert_json_error(*raw_request(proxy, b"GET / HTTP/1.1\r\nHost: x\r\n" + big_header
                                          + b"Connection: close\r\n\r\n"), 400)
    r = proxy.post("/v1/completions", json={"prompt": "x" * 4096, "max_tokens": 1})
    assert r.status == 413 and "error" in r.json()


# -- the CLI


def test_cli_lifecycle(managed):
    conf_file, port = managed()
    res = omni_ctl("status", "--nginx-conf-file", str(conf_file))
    assert res.returncode == 3 and "not running" in res.stderr

    res = omni_ctl("start", "--nginx-conf-file", str(conf_file))
    assert res.returncode == 0, res.stderr
    assert f"listening on 127.0.0.1:{port}" in res.stdout
    pid = nginxctl.status(conf_file).pid
    assert nginxctl.is_master_of(pid, conf_file)

    res = omni_ctl("start", "--nginx-conf-file", str(conf_file))
    assert res.returncode != 0 and f"already running: pid {pid}" in res.stderr

    res = omni_ctl("status", "--nginx-conf-file", str(conf_file), "--json")
    st = json.loads(res.stdout)
    assert res.returncode == 0 and st["running"] and st["pid"] == pid
    assert len(st["workers"]) == 1 and st["listen"] == [f"127.0.0.1:{port}"]

    # plain reload: new workers, same master
    old_workers = nginxctl.status(conf_file).workers
    res = omni_ctl("reload", "--nginx-conf-file", str(conf_file))
    assert res.returncode == 0, res.stderr
    st = nginxctl.status(conf_file)
    assert st.pid == pid and not set(st.workers) & set(old_workers)

    # reload with new options: re-rendered, tested, installed, reloaded
    decode = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    res = omni_ctl("reload", "--nginx-conf-file", str(conf_file), "--listen-port", str(port),
                   "--core-num", "1", "--pd-policy", "aggregated",
                   "--decode-endpoints", decode, *ROOT_USER)
    assert res.returncode == 0, res.stderr
    status = json.loads(urlget(port, "/omni/status"))
    assert [i["role"] for i in status["instances"]] == ["decode", "decode"]
    assert conf_file.with_name("nginx.conf.prev").is_file()

    # rollback: back to sequential, one decode
    res = omni_ctl("reload", "--nginx-conf-file", str(conf_file), "--rollback")
    assert res.returncode == 0, res.stderr
    status = json.loads(urlget(port, "/omni/status"))
    assert [i["role"] for i in status["instances"]] == ["prefill", "decode"]

    res = omni_ctl("stop", "--nginx-conf-file", str(conf_file))
    assert res.returncode == 0 and f"stopped: pid {pid}" in res.stdout
    assert not nginxctl.status(conf_file).running
    res = omni_ctl("stop", "--nginx-conf-file", str(conf_file))
    assert res.returncode == 0 and "not running" in res.stderr


def urlget(port, path) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.read().decode()


def test_reload_failing_test_keeps_running_config(managed):
    conf_file, port = managed()
    nginxctl.start(conf_file)
    pid = nginxctl.status(conf_file).pid
    good = conf_file.read_text()

    # invalid options: refused before anything is written or signalled
    res = omni_ctl("reload", "--nginx-conf-file", str(conf_file), "--listen-port", "0",
                   "--decode-endpoints", "127.0.0.1:1", "--prefill-endpoints", "127.0.0.1:2")
    assert res.returncode != 0 and "--listen-port '0'" in res.stderr
    assert conf_file.read_text() == good

    # a file that nginx -t rejects: no HUP, the old config keeps serving
    conf_file.write_text(good.replace("omni_pd_policy sequential;", "omni_pd_policy nope;"))
    workers = nginxctl.status(conf_file).workers
    res = omni_ctl("reload", "--nginx-conf-file", str(conf_file))
    assert res.returncode != 0
    assert "nginx -t failed" in res.stderr and "nope" in res.stderr
    st = nginxctl.status(conf_file)
    assert st.pid == pid and st.workers == workers
    assert json.loads(urlget(port, "/omni/status"))["pd_policy"] == "sequential"

    # re-rendered options that fail nginx -t (no module there): file untouched
    conf_file.write_text(good)
    res = omni_ctl("reload", "--nginx-conf-file", str(conf_file), "--core-num", "1",
                   "--listen-port", str(port), "--decode-endpoints", "127.0.0.1:1",
                   "--prefill-endpoints", "127.0.0.1:2", "--module-dir", "/nonexistent")
    assert res.returncode != 0 and "nginx -t failed" in res.stderr
    assert conf_file.read_text() == good
    assert nginxctl.status(conf_file).workers == workers

    # passes nginx -t but fails in the master (port taken): old config kept,
    # and the file goes back to what runs
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        res = omni_ctl("reload", "--nginx-conf-file", str(conf_file), "--core-num", "1",
                       "--listen-port", str(taken), "--decode-endpoints", "127.0.0.1:1",
                       "--prefill-endpoints", "127.0.0.1:2", *ROOT_USER, timeout=120)
    assert res.returncode != 0
    assert "refused the new config" in res.stderr and "[emerg]" in res.stderr
    assert conf_file.read_text() == good
    assert nginxctl.status(conf_file).pid == pid
    assert json.loads(urlget(port, "/omni/status"))["pd_policy"] == "sequential"
    (conf_file.parent / "error.log").write_text("")    # the [emerg] was expected


def test_reload_when_not_running(managed):
    conf_file, _ = managed()
    res = omni_ctl("reload", "--nginx-conf-file", str(conf_file))
    assert res.returncode == 3 and "not running" in res.stderr


def test_start_failure_reports_error_log(managed):
    conf_file, port = managed()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        res = omni_ctl("start", "--nginx-conf-file", str(conf_file), "--timeout", "5")
    assert res.returncode != 0
    assert "error.log:" in res.stderr and "[emerg]" in res.stderr
    assert "Address already in use" in res.stderr
    assert not nginxctl.status(conf_file).running
    (conf_file.parent / "error.log").write_text("")    # the [emerg] was expected


def test_stop_leaves_other_nginx_running(managed, other_nginx):
    conf_file, _ = managed()
    assert omni_ctl("start", "--nginx-conf-file", str(conf_file)).returncode == 0
    assert omni_ctl("stop", "--nginx-conf-file", str(conf_file)).returncode == 0
    assert other_answers(other_nginx)
    assert nginxctl.master_conf(other_nginx.pid) is not None


def test_stale_pid_file_never_signals_a_stranger(managed, other_nginx):
    conf_file, _ = managed()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for stranger in (other_nginx.pid, sleeper.pid, 999999999):
            (conf_file.parent / "nginx.pid").write_text(f"{stranger}\n")
            res = omni_ctl("stop", "--nginx-conf-file", str(conf_file))
            assert res.returncode == 0 and "stale pid file" in res.stderr
            res = omni_ctl("status", "--nginx-conf-file", str(conf_file))
            assert res.returncode == 3
            res = omni_ctl("reload", "--nginx-conf-file", str(conf_file))
            assert res.returncode == 3
        assert sleeper.poll() is None and other_answers(other_nginx)
        # start is not fooled either: nginx replaces the stale file
        assert omni_ctl("start", "--nginx-conf-file", str(conf_file)).returncode == 0
        assert nginxctl.status(conf_file).pid not in (other_nginx.pid, sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stop_rollback_restores_previous_file(managed):
    conf_file, port = managed()
    first = conf_file.read_text()
    render(conf_file.parent, port, "--pd-policy", "aggregated", "--prefill-endpoints", "")
    second = conf_file.read_text()
    assert first != second
    res = omni_ctl("stop", "--nginx-conf-file", str(conf_file), "--rollback")
    assert res.returncode == 0
    assert conf_file.read_text() == first
    assert conf_file.with_name("nginx.conf.prev").read_text() == second


# -- pieces, without nginx


@pytest.mark.parametrize("title, expected", [
    ("nginx: master process /usr/sbin/nginx -p /x -c /x/nginx.conf", "/x/nginx.conf"),
    ("nginx: master process nginx -c/a/b.conf", "/a/b.conf"),
    ("nginx: master process nginx -p /x/ -c conf/n.conf", "/x/conf/n.conf"),
    ("nginx: master process nginx -c n.conf", "/usr/share/nginx/n.conf"),
    ("nginx: master process /usr/sbin/nginx -g daemon off;", "/etc/nginx/nginx.conf"),
    ("nginx: worker process", None),
    ("/usr/sbin/nginx -c /x/nginx.conf", None),
    ("", None),
])
def test_conf_from_title(title, expected):
    found = nginxctl.conf_from_title(title)
    assert (str(found) if found else None) == expected


def test_read_conf(tmp_path):
    c = conf.make_conf(tmp_path / "n.conf", prefill_endpoints="127.0.0.1:1",
                       decode_endpoints="127.0.0.1:2", listen_port=1234, core_num=1,
                       prefix=str(tmp_path / "run"), module_dir="/opt/m")
    (tmp_path / "n.conf").write_text(conf.render_conf(c))
    facts = nginxctl.read_conf(tmp_path / "n.conf")
    assert facts.prefix == tmp_path / "run"
    assert facts.pid_file == tmp_path / "run" / "nginx.pid"
    assert facts.error_log == tmp_path / "run" / "error.log"
    assert str(facts.module_dir) == "/opt/m"
    assert facts.listens == ["127.0.0.1:1234"] and facts.workers == 1


def test_read_conf_without_pid(tmp_path):
    (tmp_path / "n.conf").write_text("events {}\n")
    with pytest.raises(nginxctl.NginxCtlError, match="no `pid` directive"):
        nginxctl.read_conf(tmp_path / "n.conf")


def test_bad_log_lines():
    log = "\n".join([
        "2026/01/01 00:00:00 [notice] 1#1: start worker processes",
        "2026/01/01 00:00:00 [alert] 1#1: worker process 2 exited on signal 11",
        "2026/01/01 00:00:00 [emerg] 1#1: bind() failed",
        "==3==ERROR: AddressSanitizer: heap-use-after-free on address 0x1",
        "x.c:10:5: runtime error: signed integer overflow",
        "2026/01/01 00:00:00 [error] 1#1: connect() failed",
    ])
    assert len(nginxctl.bad_log_lines(log)) == 4


def test_nginx_env_for_debug_builds(tmp_path, monkeypatch):
    monkeypatch.delenv("ASAN_OPTIONS", raising=False)
    libs = [tmp_path / "libasan.so.8", tmp_path / "libubsan.so.1"]
    for lib in libs:
        lib.write_text("")
    (tmp_path / "BUILD_INFO").write_text(
        f"debug=1\npreload={libs[0]} {libs[1]}\n")
    env = paths.nginx_env(tmp_path, base={"LD_PRELOAD": "/x/other.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"].split() == [str(libs[0]), str(libs[1]), "/x/other.so"]
    assert env["ASAN_OPTIONS"] == "detect_leaks=0"
    # already preloaded (a debug test run): not twice
    env2 = paths.nginx_env(tmp_path, base=env)
    assert env2["LD_PRELOAD"] == env["LD_PRELOAD"]
    (tmp_path / "BUILD_INFO").write_text("debug=0\n")
    assert paths.nginx_env(tmp_path, base={"PATH": "/bin"}) == {"PATH": "/bin"}
    assert paths.is_debug_build(tmp_path) is False


def test_who_can_enter_the_way_to_a_path(tmp_path):
    """The permission walk behind gen-conf's warning and `status`'s (the
    workers cannot reach the prefix or the tokenizer's socket)."""
    from omni_ctl import procfs
    uid, gids = procfs.credentials(os.getpid())
    assert uid == os.geteuid() and os.getegid() in gids
    private = tmp_path / "private"
    inner = private / "inner" / "not-yet"
    (private / "inner").mkdir(parents=True)
    private.chmod(0o700)
    stranger = 4242424                  # neither the owner, nor in its group
    assert stranger != uid
    blocked = procfs.unsearchable_dir(inner, stranger, set())
    # private, or a directory above it that is private too (pytest's own)
    assert blocked is not None and private.is_relative_to(blocked), blocked
    assert procfs.unsearchable_dir(inner, uid, gids) is None       # we made it
    assert procfs.unsearchable_dir(inner, 0, set()) is None        # root enters anything
    private.chmod(0o711)
    after = procfs.unsearchable_dir(inner, stranger, set())
    assert after is None or after != private and private.is_relative_to(after), after
    assert procfs.credentials(2 ** 22 + 12345) is None               # no such process


def test_a_master_whose_title_was_cut_short_is_still_ours(managed, other_nginx,
                                                          monkeypatch):
    """nginx writes its process title over its argv and environment, and the
    title is longer than the argv: started with a small environment (or one
    glibc rewrote, GLIBC_TUNABLES) the end of `-c FILE` is cut off. The
    master is then known by the config's error log it holds open; a
    stranger's cut title is not taken for ours. (The cut is simulated on
    the titles of two real masters: the environment a sanitizer build
    needs is too large to cut them for real.)"""
    conf_file, _ = managed()
    assert omni_ctl("start", "--nginx-conf-file", str(conf_file)).returncode == 0
    pid = nginxctl.status(conf_file).pid
    real = nginxctl._cmdline

    def cut(p):
        title = real(p)
        return title[:-12] if p in (pid, other_nginx.pid) else title
    monkeypatch.setattr(nginxctl, "_cmdline", cut)
    assert nginxctl.master_conf(pid) != conf_file                   # the name is lost
    assert nginxctl.is_master_of(pid, conf_file)
    st = nginxctl.status(conf_file)
    assert st.running and st.pid == pid and st.workers
    assert not nginxctl.is_master_of(other_nginx.pid, conf_file)
    # and stop finds it, stops it, and leaves the stranger alone
    assert nginxctl.stop(conf_file).pid == pid
    assert not nginxctl.status(conf_file).running and other_answers(other_nginx)
