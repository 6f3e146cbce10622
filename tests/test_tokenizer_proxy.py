"""`omni-ctl start`/`stop` run the tokenizer service of a config that names
a model path (real nginx with the module, real service)."""

from __future__ import annotations

import json
import socket

from conftest import free_port
from omni_ctl import nginxctl
from omni_ctl.tokenizer import control, wire
from test_nginxctl import ROOT_USER, managed, omni_ctl  # noqa: F401 (fixture)
from tokmodel import hf_tok, model_dir  # noqa: F401 (fixtures)


def test_start_and_stop_run_the_tokenizer(managed, model_dir, hf_tok):  # noqa: F811
    conf_file, port = managed("--model-path", str(model_dir))
    facts = nginxctl.read_conf(conf_file)
    assert facts.model_path == model_dir
    svc = nginxctl.tokenizer_service(facts)
    assert svc.socket == conf_file.parent / "tokenizer.sock"

    res = omni_ctl("start", "--nginx-conf-file", str(conf_file), timeout=300)
    assert res.returncode == 0, res.stderr
    st = nginxctl.status(conf_file)
    assert st.running and st.tokenizer and control.is_service(st.tokenizer, svc.socket)
    assert f"tokenizer pid {st.tokenizer}" in res.stdout
    assert len(control.worker_pids(st.tokenizer)) == facts.workers     # one per nginx worker
    status, _, body = control.request(svc.socket, "POST", "/v1/completions",
                                      json.dumps({"prompt": "through the prefix"}).encode())
    assert status == 200
    assert wire.decode(body)[2] == [hf_tok.encode("through the prefix")]
    js = json.loads(omni_ctl("status", "--nginx-conf-file", str(conf_file), "--json").stdout)
    assert js["tokenizer_pid"] == st.tokenizer

    res = omni_ctl("stop", "--nginx-conf-file", str(conf_file))
    assert res.returncode == 0, res.stderr
    assert f"stopped tokenizer: pid {st.tokenizer}" in res.stdout
    assert not control.is_service(st.tokenizer, svc.socket)
    assert not svc.socket.exists() and not svc.pid_file.exists()


def test_options_from_the_config_comment(managed, model_dir, tmp_path):  # noqa: F811
    conf_file, _ = managed("--model-path", str(model_dir))
    conf_file.write_text(conf_file.read_text()
                         + "# omni-ctl: tokenizer --workers 2 --no-reuse-cache\n")
    svc = nginxctl.tokenizer_service(nginxctl.read_conf(conf_file))
    assert svc.workers is None
    assert svc.argv()[-3:] == ["--workers", "2", "--no-reuse-cache"]


def test_a_failed_nginx_start_stops_the_tokenizer(managed, model_dir):  # noqa: F811
    conf_file, port = managed("--model-path", str(model_dir))
    svc = nginxctl.tokenizer_service(nginxctl.read_conf(conf_file))
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        res = omni_ctl("start", "--nginx-conf-file", str(conf_file), "--timeout", "5",
                       timeout=300)
    assert res.returncode != 0 and "Address already in use" in res.stderr
    assert control.running_pid(svc) is None and not svc.socket.exists()
    (conf_file.parent / "error.log").write_text("")    # the [emerg] was expected


def test_a_config_without_model_path_has_no_tokenizer(managed):  # noqa: F811
    conf_file, _ = managed()
    assert nginxctl.tokenizer_service(nginxctl.read_conf(conf_file)) is None
    res = omni_ctl("start", "--nginx-conf-file", str(conf_file))
    assert res.returncode == 0 and "tokenizer" not in res.stdout
    assert nginxctl.status(conf_file).tokenizer is None


def test_a_reload_adding_a_model_path_starts_the_tokenizer_dropping_it_stops_it(  # noqa: F811
        managed, model_dir, hf_tok):
    conf_file, port = managed()
    assert omni_ctl("start", "--nginx-conf-file", str(conf_file)).returncode == 0
    assert nginxctl.status(conf_file).tokenizer is None

    options = ["--listen-port", str(port), "--core-num", "1",
               "--prefill-endpoints", f"127.0.0.1:{free_port()}",
               "--decode-endpoints", f"127.0.0.1:{free_port()}", *ROOT_USER]
    res = omni_ctl("reload", "--nginx-conf-file", str(conf_file), *options,
                   "--model-path", str(model_dir), timeout=300)
    assert res.returncode == 0, res.stderr
    facts = nginxctl.read_conf(conf_file)
    assert facts.model_path == model_dir
    svc = nginxctl.tokenizer_service(facts)
    st = nginxctl.status(conf_file)
    assert st.running and st.tokenizer and control.is_service(st.tokenizer, svc.socket)
    status, _, body = control.request(svc.socket, "POST", "/v1/completions",
                                      json.dumps({"prompt": "after the reload"}).encode())
    assert status == 200 and wire.decode(body)[2] == [hf_tok.encode("after the reload")]

    # a second reload of the same config keeps the one service running
    res = omni_ctl("reload", "--nginx-conf-file", str(conf_file), timeout=300)
    assert res.returncode == 0, res.stderr
    assert nginxctl.status(conf_file).tokenizer == st.tokenizer

    # a reload that drops the model path stops the service (`stop` would
    # not find it any more: it reads the new config)
    res = omni_ctl("reload", "--nginx-conf-file", str(conf_file), *options, timeout=300)
    assert res.returncode == 0, res.stderr
    assert nginxctl.read_conf(conf_file).model_path is None
    assert nginxctl.status(conf_file).tokenizer is None
    assert not control.is_service(st.tokenizer, svc.socket) and not svc.socket.exists()
    assert nginxctl.status(conf_file).running


def test_status_says_when_the_workers_cannot_reach_the_tokenizer(managed, model_dir,  # noqa: F811
                                                                  tmp_path):
    """Run as root with the prefix in a root-private directory (pytest's temp
    dirs are) and workers of another user: they cannot reach the service's
    socket, so every request would fall back to the estimate; `status` says
    so instead of leaving it to the error log."""
    import os

    import pytest
    if os.geteuid() != 0:
        pytest.skip("needs root: nginx's workers of another user than ours")
    assert os.stat(tmp_path).st_mode & 0o001 == 0, "pytest's temp dir is root-private"
    conf_file, _ = managed("--model-path", str(model_dir), "--user", "nobody")
    res = omni_ctl("start", "--nginx-conf-file", str(conf_file), timeout=300)
    assert res.returncode == 0, res.stderr
    st = nginxctl.status(conf_file)
    assert st.running and st.tokenizer
    [warning] = st.warnings
    assert "cannot reach the tokenizer service" in warning and "--user root" in warning
    res = omni_ctl("status", "--nginx-conf-file", str(conf_file))
    assert res.returncode == 0 and "warning: nginx's workers (uid" in res.stderr
    js = json.loads(omni_ctl("status", "--nginx-conf-file", str(conf_file), "--json").stdout)
    assert js["warnings"] == [warning]
    # the workers can open no temp file there either: nginx says so
    (conf_file.parent / "error.log").write_text("")


def test_status_has_no_warning_when_the_workers_reach_the_tokenizer(managed,  # noqa: F811
                                                                     model_dir):
    conf_file, _ = managed("--model-path", str(model_dir))
    res = omni_ctl("start", "--nginx-conf-file", str(conf_file), timeout=300)
    assert res.returncode == 0, res.stderr
    assert nginxctl.status(conf_file).warnings == []
    assert "warning" not in omni_ctl("status", "--nginx-conf-file", str(conf_file)).stderr
