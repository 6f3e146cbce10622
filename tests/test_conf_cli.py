"""`omni-ctl gen-conf` from the command line: every bad input exits non-zero
naming the option and value and creates no file; good input passes
`nginx -t` (also as a normal user)."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from click.testing import CliRunner

from omni_ctl import paths
from omni_ctl.cli import main

GOOD = ["--prefill-endpoints", "127.0.0.1:8001,127.0.0.1:8002",
        "--decode-endpoints", "127.0.0.1:9001,127.0.0.1:9002",
        "--core-num", "2", "--start-core-index", "0", "--listen-port", "18080",
        "--pd-policy", "sequential"]


@pytest.fixture(autouse=True)
def two_cores(monkeypatch):
    monkeypatch.setenv("OMNI_CPU_COUNT", "2")


def runner():
    """A CliRunner with separate stdout and stderr (click 8.1 and 8.2+)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def text(result) -> str:
    return result.stdout + result.stderr


def gen_conf(*args):
    return runner().invoke(main, ["gen-conf", *args], catch_exceptions=False)


def with_option(name, value):
    """GOOD with one option replaced (or added)."""
    args = list(GOOD)
    if name in args:
        i = args.index(name)
        args[i + 1] = value
    else:
        args += [name, value]
    return args


# (option, value, the bad value the message must quote)
BAD = [
    ("--prefill-endpoints", "127.0.0.1:8001,127.0.0.1", "127.0.0.1"),        # malformed
    ("--prefill-endpoints", "127.0.0.1:8001,,127.0.0.1:8002", None),       # empty entry
    ("--decode-endpoints", "127.0.0.1:9001,127.0.0.1:9001", None),         # duplicate
    ("--decode-endpoints", "[::1]:9001,[::1]:9001", None),                 # duplicate
    ("--decode-endpoints", "::1:9001", None),                              # IPv6 without []
    ("--prefill-endpoints", "127.0.0.1:0", None),                          # port 0
    ("--decode-endpoints", "127.0.0.1:8000,127.0.0.1:65536", "127.0.0.1:65536"),
    ("--listen-port", "0", None),
    ("--listen-port", "70000", None),
    ("--prefill-endpoints", "", None),                                     # empty list
    ("--decode-endpoints", "", None),
    ("--model-path", "/nonexistent/model/dir", None),
    ("--start-core-index", "2", None),                                     # out of range
    ("--core-num", "3", None),
    ("--zone-size", "big", None),
    ("--prefill-starvation-timeout", "later", None),
    ("--engine-routes", "v1/models", "v1/models"),
    ("--status-allow", "everyone", "everyone"),
    ("--api-key-file", "/nonexistent/key", "/nonexistent/key"),
]


@pytest.mark.parametrize("option, value, quoted", BAD)
def test_bad_input_names_option_and_value(tmp_path, option, value, quoted):
    out = tmp_path / "x" / "nginx.conf"
    result = gen_conf("--nginx-conf-file", str(out), *with_option(option, value))
    assert result.exit_code != 0
    assert result.stderr.startswith(f"Error: invalid {option} {(quoted or value)!r}: ")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("option, value", [("--pd-policy", "both"),
                                           ("--schedule-policy", "fastest"),
                                           ("--prefill-queue-order", "lifo"),
                                           ("--listen-port", "http")])
def test_bad_choice_or_type(tmp_path, option, value):
    result = gen_conf("--nginx-conf-file", str(tmp_path / "nginx.conf"),
                      *with_option(option, value))
    assert result.exit_code != 0
    assert option in text(result) and value in text(result)
    assert list(tmp_path.iterdir()) == []


def test_core_error_says_how_many_cores(tmp_path):
    result = gen_conf("--nginx-conf-file", str(tmp_path / "n.conf"),
                      *with_option("--core-num", "4"))
    assert result.exit_code != 0
    assert "this machine has 2 cores (0-1)" in text(result)


def test_missing_conf_file_option():
    result = gen_conf(*GOOD)
    assert result.exit_code != 0 and "--nginx-conf-file" in text(result)


def test_gen_conf_writes_and_reports_path(tmp_path):
    out = tmp_path / "x" / "nginx.conf"
    result = runner().invoke(
        main, ["gen-conf", "--nginx-conf-file", str(out), *GOOD, "--module-dir", "/opt/m"])
    assert result.exit_code == 0, text(result)
    assert result.stdout.strip() == str(out)
    assert "does not exist yet" in result.stderr           # /opt/m has no module
    text = out.read_text()
    assert "load_module /opt/m/ngx_http_omni_module.so;" in text
    # same options again: identical file, no backup; other options: backup
    gen_conf("--nginx-conf-file", str(out), *GOOD, "--module-dir", "/opt/m")
    assert not (tmp_path / "x" / "nginx.conf.prev").exists()
    gen_conf("--nginx-conf-file", str(out), *with_option("--listen-port", "18081"),
             "--module-dir", "/opt/m")
    assert (tmp_path / "x" / "nginx.conf.prev").read_text() == text


def test_done_means_command_with_check(omni_module, tmp_path):
    """The issue's example: renders, loads our module, passes nginx -t."""
    out = tmp_path / "x" / "nginx.conf"
    result = runner().invoke(
        main, ["gen-conf", *GOOD, "--nginx-conf-file", str(out), "--check"])
    assert result.exit_code == 0, text(result)
    assert "nginx -t: ok" in result.stderr
    assert f"load_module {omni_module};" in out.read_text()
    # and as nginx itself is run by an operator
    subprocess.run([paths.nginx_binary(), "-t", "-q", "-p", str(out.parent), "-c", str(out)],
                   check=True, env=paths.nginx_env(), capture_output=True)


@pytest.mark.parametrize("policy, prefill", [
    ("parallel", "127.0.0.1:8001@8998,[::1]:8002@8999"),
    ("aggregated", ""),
])
def test_check_other_policies(omni_module, tmp_path, policy, prefill):
    out = tmp_path / "nginx.conf"
    result = gen_conf("--nginx-conf-file", str(out), *with_option("--pd-policy", policy),
                      "--prefill-endpoints", prefill, "--model-path", str(tmp_path),
                      "--access-log-file", "off", "--listen-host", "::1")
    assert result.exit_code == 0, text(result)
    result = gen_conf("--nginx-conf-file", str(out), *with_option("--pd-policy", policy),
                      "--prefill-endpoints", prefill, "--check")
    assert result.exit_code == 0, text(result)


def test_failed_check_installs_nothing(omni_module, tmp_path):
    # a module dir without the module: nginx -t fails, nothing is written
    out = tmp_path / "new" / "nginx.conf"
    result = gen_conf("--nginx-conf-file", str(out), *GOOD, "--module-dir",
                      str(tmp_path / "empty"), "--check")
    assert result.exit_code != 0
    assert "nginx -t failed" in text(result)
    assert not (tmp_path / "new").exists()
    # over an existing config: the old file stays as it was
    gen_conf("--nginx-conf-file", str(out), *GOOD)
    before = out.read_text()
    result = gen_conf("--nginx-conf-file", str(out), *with_option("--listen-port", "18081"),
                      "--module-dir", str(tmp_path / "empty"), "--check")
    assert result.exit_code != 0
    assert out.read_text() == before
    assert sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(".") or p.suffix in (".conf", ".prev")) == ["nginx.conf"]


def test_nginx_t_as_a_normal_user(omni_module):
    """Every path is inside the prefix: nginx -t needs no root."""
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop privileges")
        as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        probe = subprocess.run(as_user + ["test", "-r", str(omni_module)])
        if probe.returncode != 0:
            pytest.skip(f"user nobody cannot read {omni_module}")
    else:
        as_user = []
    prefix = tempfile.mkdtemp(prefix="omni-user-")
    try:
        os.chmod(prefix, 0o777)
        conf_file = os.path.join(prefix, "nginx.conf")
        subprocess.run(as_user + [sys.executable, "-m", "omni_ctl.cli", "gen-conf",
                                  "--nginx-conf-file", conf_file, *GOOD, "--check"],
                       check=True, capture_output=True,
                       env={**os.environ, "OMNI_MODULE_DIR": str(omni_module.parent)})
        res = subprocess.run(as_user + [paths.nginx_binary(), "-t", "-p", prefix,
                                        "-c", conf_file],
                             capture_output=True, text=True, env=paths.nginx_env())
        assert res.returncode == 0, res.stderr
        assert "test is successful" in res.stderr
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def test_api_key_and_status_token_from_the_command_line(omni_module, tmp_path):
    """The secrets end up in private files nginx -t accepts, never in the
    config or in an error message."""
    out = tmp_path / "nginx.conf"
    result = gen_conf("--nginx-conf-file", str(out), *GOOD, "--api-key", "sk-cli-123",
                      "--status-token", "st-cli-456", "--module-dir", str(omni_module.parent),
                      "--check")
    assert result.exit_code == 0, text(result)
    conf_text = out.read_text()
    assert "sk-cli-123" not in conf_text and "st-cli-456" not in conf_text
    assert (tmp_path / "api_key").read_text() == "sk-cli-123\n"
    assert (tmp_path / "status_token").read_text() == "st-cli-456\n"
    assert oct((tmp_path / "api_key").stat().st_mode & 0o777) == "0o600"
    result = gen_conf("--nginx-conf-file", str(tmp_path / "y" / "nginx.conf"), *GOOD,
                      "--api-key", "has space secret")
    assert result.exit_code != 0
    assert "has space secret" not in text(result) and "--api-key" in text(result)
