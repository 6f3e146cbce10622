"""Where the built nginx module and the nginx binary are, and the environment
nginx needs to load a module built with the sanitizers.

build.sh installs the module as build/modules/ngx_http_omni_module.so with a
BUILD_INFO file beside it (`key=value` lines: debug=0|1, nginx_version,
preload=<sanitizer runtimes>).  OMNI_MODULE_DIR overrides the directory,
OMNI_NGINX the binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

MODULE_FILE = "ngx_http_omni_module.so"
BUILD_INFO_FILE = "BUILD_INFO"
REPO_ROOT = Path(__file__).resolve().parent.parent

# A sanitized module inside Debian's unsanitized nginx needs the runtimes
# loaded first; leak checking is off because nginx frees its pools at exit
# only partly, by design.
ASAN_DEFAULTS = "detect_leaks=0"


class NginxNotFound(RuntimeError):
    """No nginx binary; the message says how to get one."""


def module_dir() -> Path:
    """The directory holding the built module (OMNI_MODULE_DIR or
    <repo>/build/modules)."""
    env = os.environ.get("OMNI_MODULE_DIR")
    return Path(env).resolve() if env else REPO_ROOT / "build" / "modules"


def module_path(directory: str | os.PathLike | None = None) -> Path:
    return Path(directory or module_dir()) / MODULE_FILE


def nginx_binary() -> str:
    """OMNI_NGINX, else /usr/sbin/nginx, else `nginx` on PATH."""
    for candidate in (os.environ.get("OMNI_NGINX"), "/usr/sbin/nginx",
                      shutil.which("nginx")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise NginxNotFound("nginx not found (looked at $OMNI_NGINX, /usr/sbin/nginx "
                        "and PATH); run `bash build.sh`, which installs it")


def build_info(directory: str | os.PathLike | None = None) -> dict[str, str]:
    """BUILD_INFO beside the module as a dict; empty when there is none."""
    path = Path(directory or module_dir()) / BUILD_INFO_FILE
    info = {}
    try:
        text = path.read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            info[key.strip()] = value.strip()
    return info


def is_debug_build(directory: str | os.PathLike | None = None) -> bool:
    return build_info(directory).get("debug") == "1"


def sanitizer_preload(directory: str | os.PathLike | None = None) -> list[str]:
    """The runtimes to LD_PRELOAD for a debug module (BUILD_INFO's preload=,
    else asked from gcc); [] for a release module."""
    info = build_info(directory)
    if info.get("debug") != "1":
        return []
    libs = info.get("preload", "").split()
    if libs and all(os.path.exists(lib) for lib in libs):
        return libs
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        try:
            out = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True,
                                 text=True, check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and os.path.isabs(out) and os.path.exists(out):
            libs.append(os.path.realpath(out))
    return libs


def nginx_env(directory: str | os.PathLike | None = None,
              base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to run nginx with the module in `directory`: `base`
    (default os.environ) plus LD_PRELOAD/ASAN_OPTIONS for a debug build."""
    env = dict(os.environ if base is None else base)
    libs = sanitizer_preload(directory)
    if not libs:
        return env
    # the sanitizer runtimes must come first in the preload list
    others = [p for p in env.get("LD_PRELOAD", "").split()
              if os.path.realpath(p) not in libs]
    env["LD_PRELOAD"] = " ".join(libs + others)
    asan = env.get("ASAN_OPTIONS", "")
    if "detect_leaks=" not in asan:
        env["ASAN_OPTIONS"] = f"{ASAN_DEFAULTS}:{asan}" if asan else ASAN_DEFAULTS
    return env
