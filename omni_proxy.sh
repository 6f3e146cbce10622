#!/usr/bin/env bash
# omni_proxy.sh: the original Omni Proxy command line, mapped onto omni-ctl.
#
# Usage: bash omni_proxy.sh [OPTIONS]
#
#   --nginx-conf-file PATH        config to write and run
#                                 (default: /usr/local/nginx/conf/nginx.conf)
#   --listen-port PORT            --listen-host IP
#   --core-num N                  --start-core-index N
#   --prefill-endpoints H:P[@BOOT],...
#   --decode-endpoints H:P,...
#   --log-file PATH               --log-level LEVEL
#   --access-log-file PATH|off    --prefix DIR
#   --omni-proxy-X VALUE          any gen-conf option --X VALUE, e.g.
#                                 --omni-proxy-pd-policy sequential|parallel|aggregated
#                                 --omni-proxy-model-path DIR
#                                 --omni-proxy-schedule-policy omni|cache-aware|...
#                                 --omni-proxy-queue-max N  --omni-proxy-api-key KEY
#                                 (`omni-ctl gen-conf --help` lists them all)
#
# Actions (default: render, test, then start, or reload when it already runs):
#   --dry-run     render and test (nginx -t) only; cores this machine lacks
#                 are a warning, as the file may be meant for another machine
#   --reload      re-render from the options given (if any), test, reload
#   --stop        stop the nginx of --nginx-conf-file (only that one)
#   --rollback    go back to the previous config (PATH.prev): with --stop
#                 after stopping, alone or with --reload by reloading it
#   -h, --help    this text
#
# Defaults not listed are omni-ctl's (`omni-ctl gen-conf --help`).
# PYTHONHASHSEED does not matter to Omni Proxy (see README.md).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
    sed -n '2,/^# PYTHONHASHSEED/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

fail() {
    echo "omni_proxy.sh: $*" >&2
    exit 2
}

omni_ctl=${OMNI_CTL:-}
if [ -z "$omni_ctl" ]; then
    if [ -x "$ROOT/.venv/bin/omni-ctl" ]; then
        omni_ctl="$ROOT/.venv/bin/omni-ctl"
    elif command -v omni-ctl >/dev/null 2>&1; then
        omni_ctl=$(command -v omni-ctl)
    else
        echo "omni_proxy.sh: omni-ctl not found; run: bash $ROOT/build.sh" >&2
        exit 1
    fi
fi

conf_file=/usr/local/nginx/conf/nginx.conf
gen=()
action=start
rollback=0

set_action() {
    if [ "$action" != start ] && [ "$action" != "$1" ]; then
        fail "--$action and --$1 cannot be combined"
    fi
    action=$1
}

while [ $# -gt 0 ]; do
    arg=$1
    shift
    value_given=0
    if [[ "$arg" == --*=* ]]; then
        set -- "${arg#*=}" "$@"
        arg=${arg%%=*}
        value_given=1
    fi
    case "$arg" in
        # the seed's own names (the options marked seed=True in
        # omni_ctl/conf.py's table; tests/test_omni_proxy_sh.py checks)
        --nginx-conf-file|--listen-port|--listen-host|--core-num|--start-core-index|\
        --prefill-endpoints|--decode-endpoints|--log-file|--log-level|\
        --access-log-file|--prefix|\
        --omni-proxy-?*)
            if [ $# -eq 0 ]; then
                usage >&2
                fail "$arg needs a value"
            fi
            if [ "$arg" = --nginx-conf-file ]; then
                conf_file=$1
            elif [[ "$arg" == --omni-proxy-* ]]; then
                gen+=("--${arg#--omni-proxy-}" "$1")
            else
                gen+=("$arg" "$1")
            fi
            shift
            ;;
        --dry-run|--stop|--reload)
            [ "$value_given" = 0 ] || fail "$arg takes no value"
            set_action "${arg#--}"
            ;;
        --rollback)
            [ "$value_given" = 0 ] || fail "$arg takes no value"
            rollback=1
            ;;
        -h|--help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            fail "unknown option '$arg'"
            ;;
    esac
done

ctl() {
    echo "+ omni-ctl $*" >&2
    "$omni_ctl" "$@"
}

running() {
    "$omni_ctl" status --nginx-conf-file "$conf_file" >/dev/null 2>&1
}

case "$action" in
    dry-run)
        [ "$rollback" = 0 ] || fail "--rollback does not go with --dry-run"
        ctl gen-conf --nginx-conf-file "$conf_file" "${gen[@]}" --check --allow-missing-cores
        ;;
    stop)
        [ ${#gen[@]} -eq 0 ] || fail "--stop takes only --nginx-conf-file (and --rollback)"
        if [ "$rollback" = 1 ]; then
            ctl stop --nginx-conf-file "$conf_file" --rollback
        else
            ctl stop --nginx-conf-file "$conf_file"
        fi
        ;;
    reload)
        if [ "$rollback" = 1 ]; then
            [ ${#gen[@]} -eq 0 ] || fail "--rollback takes no config options"
            ctl reload --nginx-conf-file "$conf_file" --rollback
        else
            ctl reload --nginx-conf-file "$conf_file" "${gen[@]}"
        fi
        ;;
    start)
        if [ "$rollback" = 1 ]; then
            [ ${#gen[@]} -eq 0 ] || fail "--rollback takes no config options"
            if running; then
                ctl reload --nginx-conf-file "$conf_file" --rollback
            else
                ctl stop --nginx-conf-file "$conf_file" --rollback
            fi
            exit 0
        fi
        ctl gen-conf --nginx-conf-file "$conf_file" "${gen[@]}" --check
        if running; then
            ctl reload --nginx-conf-file "$conf_file"
        else
            ctl start --nginx-conf-file "$conf_file"
        fi
        ;;
esac
