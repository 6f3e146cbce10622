"""cffi (API, out-of-line) builder for the scoring library.

The C sources live in nginx_modules/scoring/ and are compiled both into the
nginx module (by nginx's own build) and into this Python extension,
omni_ctl.scoring._scoring.  The cdef text is kept in
omni_ctl/scoring/cdefs/*.cdef, one file per component, and is concatenated
in name order.

Run by path (the package cannot be imported before its extension exists):
``python omni_ctl/scoring/build.py`` builds in place (build.sh does);
setup.py names it in ``cffi_modules``.  OMNI_DEBUG=1 in the environment
builds with ASan/UBSan (build.sh --debug).
"""

import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent

if (__name__ == "__main__" and sys.path and sys.path[0]
        and pathlib.Path(sys.path[0]).resolve() == HERE):
    # run as a script: this package's modules (errors, build...) must not
    # stand in for top-level ones while cffi and setuptools import theirs
    sys.path[0] = str(ROOT)

from cffi import FFI                            # noqa: E402
SCORING = ROOT / "nginx_modules" / "scoring"

ffibuilder = FFI()

for cdef in sorted((HERE / "cdefs").glob("*.cdef")):
    ffibuilder.cdef(cdef.read_text())

# setuptools wants source paths relative to the project (its working
# directory); the in-place build below runs from a temp dir and wants them
# absolute.
_absolute = __name__ == "__main__"
_sources = sorted(str(p if _absolute else p.relative_to(ROOT))
                  for p in SCORING.glob("*.c"))
_headers = "".join(
    f'#include "{p.name}"\n' for p in sorted(SCORING.glob("omni_*.h"))
)

if os.environ.get("OMNI_DEBUG") == "1":
    _cflags = ["-std=gnu11", "-O1", "-g", "-fno-omit-frame-pointer",
               "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
               "-Wall", "-Wextra", "-Werror"]
    _ldflags = ["-fsanitize=address,undefined"]
else:
    _cflags = ["-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-Werror"]
    _ldflags = []



def _xxhash_dispatch():
    """Does the system libxxhash export its x86 dispatcher (nginx_modules/
    config makes the same check for the module)?"""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("xxhash")
    if name is None or not pathlib.Path("/usr/include/xxh_x86dispatch.h").exists():
        return False
    try:
        return hasattr(ctypes.CDLL(name), "XXH3_64bits_withSeed_dispatch")
    except OSError:
        return False


ffibuilder.set_source(
    "omni_ctl.scoring._scoring",
    _headers,
    sources=_sources,
    include_dirs=[str(SCORING)],
    libraries=["xxhash"],
    define_macros=[("OMNI_HASH_DISPATCH", None)] if _xxhash_dispatch() else [],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    # build.sh compiles in place: python omni_ctl/scoring/build.py
    # and moves the extension next to this file, replacing any other build
    # of it (pip's editable install names it _scoring.abi3.so).
    import shutil
    built = pathlib.Path(ffibuilder.compile(tmpdir=str(ROOT / "build" / "cffi")))
    for old in HERE.glob("_scoring.*.so"):
        old.unlink()
    shutil.copy2(built, HERE / built.name)
