"""The nginx module's files call each other in one direction only.

The header's file map (nginx_modules/ngx_http_omni.h) lists the module's C
files lowest layer first; a file may call functions of files listed before
it, never after, so no two files call each other in a circle.  Checked on the
objects of the last build (nm: functions each object defines and uses), and
each file stays under ~1,000 lines.
"""

import re
import shutil
import subprocess
from pathlib import Path

from omni_ctl import paths

SRC = paths.REPO_ROOT / "nginx_modules"


def _objects() -> Path:
    info = (paths.module_dir() / "BUILD_INFO").read_text()
    flavor = "debug" if "debug=1" in info else "release"
    objs = paths.REPO_ROOT / "build" / f"nginx-{flavor}" / "objs" / "addon" / "nginx_modules"
    assert objs.is_dir(), f"{objs} is missing: run `bash build.sh`"
    return objs


def _file_map() -> list[str]:
    header = (SRC / "ngx_http_omni.h").read_text()
    top = header[:header.index("*/")]
    return re.findall(r"^ \*   (ngx_http_omni_\w+)\.c", top, re.M)


def _calls(objs: Path) -> dict[str, set[str]]:
    nm = shutil.which("nm")
    assert nm, "nm (binutils) is needed"
    defined, used = {}, {}
    for obj in sorted(objs.glob("ngx_http_omni_*.o")):
        out = subprocess.run([nm, str(obj)], capture_output=True, text=True,
                             check=True).stdout
        d, u = set(), set()
        for line in out.splitlines():
            f = line.split()
            if len(f) == 3 and f[1] == "T":
                d.add(f[2])
            elif len(f) == 2 and f[0] == "U":
                u.add(f[1])
        defined[obj.stem], used[obj.stem] = d, u
    owner = {sym: name for name, syms in defined.items() for sym in syms}
    return {name: {owner[s] for s in u if s in owner and owner[s] != name}
            for name, u in used.items()}


# a separate nginx module in the same .so, outside the layers (see the header)
STANDALONE = {"ngx_http_omni_access_module"}


def test_every_file_is_in_the_map():
    files = sorted(p.stem for p in SRC.glob("ngx_http_omni_*.c"))
    assert sorted(_file_map() + sorted(STANDALONE)) == files


def test_calls_go_one_way():
    order = _file_map()
    rank = {name: i for i, name in enumerate(order)}
    calls = _calls(_objects())
    for name in STANDALONE:
        assert not calls.pop(name, set()), f"{name} calls the layered files"
    assert not [a for a, callees in calls.items() if callees & STANDALONE]
    assert set(calls) == set(order), (sorted(calls), order)
    wrong = sorted((a, b) for a, callees in calls.items() for b in callees
                   if rank[b] >= rank[a])
    assert not wrong, f"calls against the file map's order: {wrong}"


def test_files_stay_small():
    big = {p.name: n for p in SRC.glob("ngx_http_omni*.[ch]")
           if (n := len(p.read_text().splitlines())) > 1000}
    assert not big, big
