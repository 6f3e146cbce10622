"""build.sh: argument handling, the non-root prerequisite message, and that
re-running it on a built tree is a fast no-op."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from omni_ctl import paths

ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "build.sh"


def clean_env(**extra):
    """Our environment without the sanitizer preload of a debug test run
    (bash, make and gcc need none of it)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    env.update(extra)
    return env


def test_unknown_option_fails_with_one_line():
    res = subprocess.run(["bash", str(BUILD_SH), "--frobnicate"], capture_output=True,
                         text=True, timeout=30, env=clean_env())
    assert res.returncode != 0
    assert res.stderr.splitlines()[-1] == "build.sh: error: unknown option '--frobnicate'"


def test_help():
    res = subprocess.run(["bash", str(BUILD_SH), "--help"], capture_output=True, text=True,
                         timeout=30, env=clean_env())
    assert res.returncode == 0 and "--debug" in res.stdout and "--test" in res.stdout


def test_missing_packages_as_normal_user():
    """Not root: no apt-get, one line with the exact command to run."""
    # a world-readable copy: pytest's own temp dirs are private to root
    copy = Path(tempfile.mkdtemp(prefix="omni-build-"))
    try:
        os.chmod(copy, 0o755)
        shutil.copy(BUILD_SH, copy / "build.sh")
        argv = ["bash", str(copy / "build.sh")]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv to drop privileges")
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] + argv
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/",
                             env=clean_env(OMNI_NGINX_SRC="/nonexistent/nginx-src"))
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith("build.sh: error: missing system packages (")
        assert "nginx-dev" in lines[0]
        assert "run: sudo apt-get update && sudo apt-get install -y" in lines[0]
        assert not (copy / "build").exists()
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_rerun_is_a_fast_noop():
    info = paths.build_info()
    if not info:
        pytest.fail("no build/modules/BUILD_INFO: run `bash build.sh` first")
    argv = ["bash", str(BUILD_SH)] + (["--debug"] if info.get("debug") == "1" else [])
    # the first run catches up with sources edited since the last build (a
    # shared working tree); the second has nothing to do
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=clean_env())
    assert first.returncode == 0, first.stderr
    module = paths.module_path()
    before = module.stat().st_mtime_ns
    started = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=clean_env())
    elapsed = time.monotonic() - started
    assert res.returncode == 0, res.stderr
    assert f"module: {module}" in res.stdout
    assert f"cli:    {ROOT / '.venv' / 'bin' / 'omni-ctl'}" in res.stdout
    assert res.stderr == "", "a re-run should rebuild nothing:\n" + res.stderr
    assert module.stat().st_mtime_ns == before
    assert elapsed < 10, f"re-run took {elapsed:.1f}s"
