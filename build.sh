#!/usr/bin/env bash
# Build Omni Proxy: the nginx module (against the installed nginx's own build
# tree), the scoring library's cffi extension and the .venv with omni-ctl.
#
#   bash build.sh                      release build (-O2)
#   bash build.sh --debug              ASan/UBSan build (for the tests)
#   bash build.sh --test [--debug] [--] [pytest args...]
#                                      build, then run the test suite
#                                      (pytest args after --test/--debug;
#                                      put -- before ones like --debug)
#
# Safe to re-run: each step keeps a stamp of its inputs under build/ and is
# skipped when they have not changed.  Outputs:
#   build/modules/ngx_http_omni_module.so   (+ BUILD_INFO: debug=0|1, ...)
#   .venv/bin/omni-ctl
# Environment: PYTHON (interpreter for .venv, default python3),
# OMNI_NGINX_SRC (nginx build tree, default /usr/share/nginx/src),
# OMNI_NGINX (nginx binary, default /usr/sbin/nginx or nginx on PATH).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD="$ROOT/build"
LOGS="$BUILD/logs"
VENV="$ROOT/.venv"
NGINX_SRC=${OMNI_NGINX_SRC:-/usr/share/nginx/src}
MODULE=ngx_http_omni_module

debug=0
run_tests=0
pytest_args=()

usage() {
    sed -n '2,/^$/{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() {
    echo "build.sh: error: $*" >&2
    exit 1
}

note() {
    echo "build.sh: $*" >&2
}

# anything else that fails stops the build with one line saying what
trap 'die "line $LINENO failed: $BASH_COMMAND"' ERR

while [ $# -gt 0 ]; do
    case "$1" in
        --debug) debug=1 ;;
        --test) run_tests=1 ;;
        -h|--help) usage; exit 0 ;;
        --)
            [ "$run_tests" = 1 ] || die "'--' (pytest arguments follow) needs --test"
            shift
            pytest_args=("$@")
            break
            ;;
        *)
            if [ "$run_tests" = 1 ]; then
                pytest_args=("$@")
                break
            fi
            usage >&2
            die "unknown option '$1'"
            ;;
    esac
    shift
done

flavor=release
[ "$debug" = 1 ] && flavor=debug

# run_step NAME LOG CMD...: run CMD with its output in LOG; on failure show
# the end of LOG and stop with one line naming the step.
run_step() {
    local name=$1 log=$2
    shift 2
    mkdir -p "$(dirname "$log")" || die "cannot create $(dirname "$log")"
    if ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2 || true
        die "$name failed (full log: $log)"
    fi
}

hash_of() {
    # a stable digest of the arguments and of the files they name
    local item
    for item in "$@"; do
        if [ -f "$item" ]; then
            printf '%s\n' "$item"
            cat "$item"
        else
            printf '%s\n' "$item"
        fi
    done | sha256sum | cut -d' ' -f1
}

# ---------------------------------------------------------------------------
# 1. System prerequisites

nginx_bin=${OMNI_NGINX:-}
if [ -z "$nginx_bin" ]; then
    if [ -x /usr/sbin/nginx ]; then
        nginx_bin=/usr/sbin/nginx
    else
        nginx_bin=$(command -v nginx || true)
    fi
fi

PYTHON=${PYTHON:-python3}

python_ok() {
    command -v "$PYTHON" >/dev/null 2>&1 || return 1
    "$PYTHON" - <<'EOF' >/dev/null 2>&1
import os, sys, sysconfig
import venv, ensurepip  # noqa: F401
assert sys.version_info >= (3, 10)
assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
EOF
}

find_missing() {
    missing=()
    [ -n "$nginx_bin" ] && [ -x "$nginx_bin" ] || missing+=(nginx)
    [ -f "$NGINX_SRC/configure" ] && [ -f "$NGINX_SRC/src/core/nginx.h" ] \
        || missing+=(nginx-dev)
    command -v gcc >/dev/null 2>&1 || missing+=(gcc)
    command -v make >/dev/null 2>&1 || missing+=(make)
    [ -f /usr/include/xxhash.h ] || missing+=(libxxhash-dev)
    python_ok || missing+=(python3 python3-venv python3-dev)
    # the tests include a short bench-overhead run, which drives wrk
    [ "$run_tests" = 1 ] && ! command -v wrk >/dev/null 2>&1 && missing+=(wrk)
    true
}

find_missing
if [ ${#missing[@]} -gt 0 ]; then
    install_cmd="apt-get install -y --no-install-recommends ${missing[*]}"
    if [ "$(id -u)" != 0 ]; then
        die "missing system packages (${missing[*]}); run: sudo apt-get update && sudo $install_cmd"
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "missing system packages (${missing[*]}) and no apt-get to install them"
    note "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    mkdir -p "$LOGS"
    # package lists are often empty on a fresh machine: update only then
    if ! apt-get install -y --no-install-recommends "${missing[@]}" \
            >"$LOGS/apt.log" 2>&1; then
        run_step "apt-get update" "$LOGS/apt-update.log" apt-get update
        run_step "$install_cmd" "$LOGS/apt.log" \
            apt-get install -y --no-install-recommends "${missing[@]}"
    fi
    if [ -z "$nginx_bin" ] || [ ! -x "$nginx_bin" ]; then
        nginx_bin=/usr/sbin/nginx
        [ -x "$nginx_bin" ] || nginx_bin=$(command -v nginx || true)
    fi
    find_missing
    if [ ${#missing[@]} -gt 0 ]; then
        python_ok || die "$PYTHON is not Python >= 3.10 with venv and headers; set PYTHON=/path/to/python3.10+"
        die "still missing after apt-get: ${missing[*]} (nginx-dev tree: $NGINX_SRC)"
    fi
fi

# The module must be built against the very nginx it is loaded into.
nginx_version=$("$nginx_bin" -v 2>&1 | sed -n 's|^nginx version: nginx/\([0-9.]*\).*|\1|p')
src_version=$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' "$NGINX_SRC/src/core/nginx.h")
[ -n "$nginx_version" ] || die "cannot read the version of $nginx_bin"
[ "$nginx_version" = "$src_version" ] \
    || die "nginx is $nginx_version but $NGINX_SRC is $src_version; install matching nginx and nginx-dev packages"

# ---------------------------------------------------------------------------
# 2. The nginx module

if [ "$debug" = 1 ]; then
    cc_opt="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fPIC"
    ld_opt="-fsanitize=address,undefined"
else
    cc_opt="-g -O2 -fPIC"
    ld_opt=""
fi

ngx_build="$BUILD/nginx-$flavor"
jobs=$(nproc 2>/dev/null || echo 2)

# configure reads nginx_modules/config, which lists the scoring library's C
# files: re-run it when that file, the list of C files or the flags change.
configure_inputs=("nginx=$nginx_version" "src=$NGINX_SRC" "cc=$cc_opt" "ld=$ld_opt"
                  "$ROOT/nginx_modules/config"
                  "$(cd "$ROOT/nginx_modules" && ls -1 ./*.c ./*.h scoring/*.c scoring/*.h 2>/dev/null)")
configure_stamp=$(hash_of "${configure_inputs[@]}")

if [ ! -f "$ngx_build/objs/Makefile" ] \
        || [ "$(cat "$ngx_build/.configure-stamp" 2>/dev/null)" != "$configure_stamp" ]; then
    note "configuring the nginx module ($flavor)"
    rm -rf "$ngx_build"
    mkdir -p "$BUILD"
    cp -r "$NGINX_SRC" "$ngx_build" || die "cannot copy $NGINX_SRC to $ngx_build"
    # shellcheck disable=SC2054
    configure_args=(--with-compat --with-threads --with-http_ssl_module
                    --with-http_v2_module "--with-cc-opt=$cc_opt"
                    "--add-dynamic-module=$ROOT/nginx_modules")
    [ -n "$ld_opt" ] && configure_args+=("--with-ld-opt=$ld_opt")
    run_step "nginx configure" "$LOGS/configure-$flavor.log" \
        bash -c 'cd "$1" && shift && ./configure "$@"' _ "$ngx_build" "${configure_args[@]}"
    echo "$configure_stamp" >"$ngx_build/.configure-stamp"
fi

run_step "module build (make modules)" "$LOGS/make-$flavor.log" \
    make -C "$ngx_build" -f objs/Makefile -j"$jobs" modules

built_so="$ngx_build/objs/$MODULE.so"
[ -f "$built_so" ] || die "make finished but $built_so is missing"

# LD_PRELOAD a sanitized module needs inside Debian's (unsanitized) nginx
preload=""
if [ "$debug" = 1 ]; then
    for lib in libasan.so libubsan.so; do
        path=$(gcc -print-file-name="$lib")
        [ -e "$path" ] || die "gcc has no $lib (install gcc's sanitizer runtimes, e.g. libasan8 libubsan1)"
        preload="$preload${preload:+ }$(readlink -f "$path")"
    done
fi

modules_dir="$BUILD/modules"
mkdir -p "$modules_dir"
build_info="debug=$debug
nginx_version=$nginx_version
nginx_binary=$nginx_bin
preload=$preload
"
if ! cmp -s "$built_so" "$modules_dir/$MODULE.so" \
        || [ "$(cat "$modules_dir/BUILD_INFO" 2>/dev/null)" != "${build_info%$'\n'}" ]; then
    cp "$built_so" "$modules_dir/.$MODULE.so.tmp"
    mv -f "$modules_dir/.$MODULE.so.tmp" "$modules_dir/$MODULE.so"
    printf '%s' "$build_info" >"$modules_dir/.BUILD_INFO.tmp"
    mv -f "$modules_dir/.BUILD_INFO.tmp" "$modules_dir/BUILD_INFO"
    note "installed $modules_dir/$MODULE.so ($flavor)"
fi

# the module must load into the installed nginx (catches ABI mismatches here,
# not in the first test)
check_dir="$BUILD/load-check"
mkdir -p "$check_dir"
cat >"$check_dir/nginx.conf" <<EOF
load_module $modules_dir/$MODULE.so;
pid $check_dir/nginx.pid;
error_log $check_dir/error.log;
events { }
EOF
load_env=()
[ -n "$preload" ] && load_env=(env "LD_PRELOAD=$preload" "ASAN_OPTIONS=detect_leaks=0")
run_step "loading the module into $nginx_bin" "$LOGS/load-check.log" \
    "${load_env[@]}" "$nginx_bin" -t -q -p "$check_dir" -c "$check_dir/nginx.conf"

# ---------------------------------------------------------------------------
# 3. The virtual environment and omni-ctl

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    note "creating $VENV"
    rm -rf "$VENV"
    run_step "creating the virtual environment" "$LOGS/venv.log" "$PYTHON" -m venv "$VENV"
fi

venv_version=$("$VENV/bin/python" -c 'import sys; print(sys.version)')
pip_stamp=$(hash_of "$venv_version" "$ROOT/pyproject.toml" "$ROOT/setup.py")
if [ "$(cat "$BUILD/.pip-stamp" 2>/dev/null)" != "$pip_stamp" ] \
        || [ ! -x "$VENV/bin/omni-ctl" ]; then
    note "installing the package and its dependencies into $VENV (pip; may download)"
    run_step "pip install -e '.[test,peers]'" "$LOGS/pip.log" \
        "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT[test,peers]"
    echo "$pip_stamp" >"$BUILD/.pip-stamp"
    # pip built the extension its own way: rebuild it below
    rm -f "$BUILD/.cffi-stamp"
fi

# the scoring library as a cffi extension, in place in omni_ctl/scoring/
cffi_stamp=$(hash_of "flavor=$flavor" "$venv_version" "$ROOT/omni_ctl/scoring/build.py" \
             "$ROOT"/nginx_modules/scoring/*.c "$ROOT"/nginx_modules/scoring/*.h \
             "$ROOT"/omni_ctl/scoring/cdefs/*.cdef)
if [ "$(cat "$BUILD/.cffi-stamp" 2>/dev/null)" != "$cffi_stamp" ] \
        || ! ls "$ROOT"/omni_ctl/scoring/_scoring*.so >/dev/null 2>&1; then
    note "building the scoring library's cffi extension ($flavor)"
    rm -f "$ROOT"/omni_ctl/_scoring*.so     # where it was before omni_ctl/scoring/
    run_step "cffi extension build" "$LOGS/cffi-$flavor.log" \
        env OMNI_DEBUG="$debug" bash -c 'cd "$1" && "$2" omni_ctl/scoring/build.py' \
        _ "$ROOT" "$VENV/bin/python"
    echo "$cffi_stamp" >"$BUILD/.cffi-stamp"
fi

run_step "omni-ctl --help" "$LOGS/omni-ctl.log" "$VENV/bin/omni-ctl" --help

echo "module: $modules_dir/$MODULE.so ($flavor build)"
echo "cli:    $VENV/bin/omni-ctl"

# ---------------------------------------------------------------------------
# 4. Tests

if [ "$run_tests" = 1 ]; then
    test_env=()
    if [ "$debug" = 1 ]; then
        # the cffi extension in the pytest process is sanitized too
        test_env=("LD_PRELOAD=$preload"
                  "ASAN_OPTIONS=detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
                  "UBSAN_OPTIONS=print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}")
    fi
    note "running the tests ($flavor)"
    cd "$ROOT"
    rc=0
    env "${test_env[@]}" "$VENV/bin/python" -m pytest "${pytest_args[@]}" || rc=$?
    case $rc in
        0) ;;
        5) die "pytest collected no tests" ;;
        *) die "tests failed (pytest exit code $rc)" ;;
    esac
fi
