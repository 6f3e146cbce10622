"""`omni-ctl gen-conf` as plain functions: validate the options into a
`ProxyConf`, render nginx.conf from templates/nginx.conf.j2, test it with
`nginx -t` and install it atomically (keeping the previous file as F.prev).

Nothing is written before every option has been validated, and a file that
fails `nginx -t` never replaces the installed one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import click
import jinja2

from . import __version__, paths, procfs

PD_POLICIES = ("sequential", "parallel", "aggregated")
SCHEDULE_POLICIES = ("omni", "cache-aware", "least-loaded", "round-robin")
QUEUE_ORDERS = ("sjf", "fcfs")
LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")

# SGLang's default bootstrap port, used for a prefill endpoint without @PORT
DEFAULT_BOOTSTRAP_PORT = 8998

# nginx's own error pages (HTML) replaced by OpenAI-style JSON bodies:
# status -> (status sent, error type, message)
ERROR_PAGES = {
    400: (400, "invalid_request_error", "bad request"),
    403: (403, "permission_error", "forbidden"),
    404: (404, "invalid_request_error", "not found"),
    405: (405, "invalid_request_error", "method not allowed"),
    408: (408, "invalid_request_error", "request timed out"),
    413: (413, "invalid_request_error", "request body too large"),
    414: (414, "invalid_request_error", "request URI too long"),
    494: (400, "invalid_request_error", "request header too large"),
    500: (500, "server_error", "internal server error"),
    502: (502, "server_error", "bad gateway: the upstream instance failed"),
    503: (503, "server_error", "service unavailable"),
    504: (504, "server_error", "gateway timeout: the upstream instance did not answer in time"),
}

# ---------------------------------------------------------------------------
# the option table: every gen-conf option is declared here once.  The click
# options (conf_cli), the defaults, the validated ProxyConf's fields, the
# omni_* http directives the template renders, omni_proxy.sh's --omni-proxy-X
# and the option tables of docs/configuration.md all come from it.

SECTIONS = {
    "instances": "Instances and modes",
    "scheduler": "Limits of the scheduler",
    "front": "The front door",
    "listen": "Listening, workers, processes",
    "upstream": "Upstreams and timeouts",
    "files": "Files",
    "agent": "The KV-event agent",
}


@dataclasses.dataclass(frozen=True)
class Option:
    """One gen-conf option.

    kind says how the value is validated: "int" (minimum/maximum), "duration"
    (nginx units; a bare number is in `unit`; stored in ms as NAME_ms),
    "size" (nginx units, stored as nginx writes it), "choice" (choices), or
    "special" (validated by make_conf itself).  directive is the omni_* http
    directive the option becomes (rendered from this table, and reported
    by /omni/status under its name without omni_); renders says, for the
    docs, where any other option ends up."""

    name: str
    kind: str
    default: object
    help: str
    section: str
    metavar: str | None = None
    minimum: int | None = None
    maximum: int | None = None
    unit: str = "s"
    choices: tuple = ()
    directive: str | None = None
    renders: str = ""
    doc: str = ""                   # docs only: said after help
    default_doc: str | None = None  # how the docs and --help show the default
    seed: bool = False              # omni_proxy.sh takes it without --omni-proxy-

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def field(self) -> str:
        """ProxyConf's attribute for the validated value."""
        return f"{self.name}_ms" if self.kind == "duration" else self.name

    @property
    def shown_default(self) -> str | None:
        if self.default_doc is not None:
            return self.default_doc
        return None if self.default is None else str(self.default)


_AGENT_LINE = "the `# omni-ctl: agent ...` line (`omni-ctl start` runs the agent)"

OPTIONS: tuple[Option, ...] = (
    # -- instances and modes
    Option("prefill_endpoints", "special", "", (
        "Prefill instances, comma separated; IPv6 as [::1]:8001; @BOOT is an "
        "SGLang bootstrap port (parallel mode, default 8998)."), "instances",
           metavar="H:P[@BOOT],...", seed=True, default_doc="none", doc=(
               "A host name is resolved by nginx when it loads the config; @BOOT "
               "needs an IP address, because nginx matches it by resolved address. "
               "Required in sequential and parallel mode, refused in aggregated mode.")),
    Option("decode_endpoints", "special", "", (
        "Decode instances (in aggregated mode: the only tier)."), "instances",
           metavar="H:P,...", seed=True, default_doc="none", doc="Always required."),
    Option("pd_policy", "choice", "sequential", (
        "sequential (vLLM), parallel (SGLang) or aggregated (no P/D)."), "instances",
           choices=PD_POLICIES, directive="omni_pd_policy", doc=(
               "sequential: prefill, then decode with the prefill's "
               "`kv_transfer_params`; parallel: both legs at once with a bootstrap "
               "room; aggregated: one tier.")),
    Option("schedule_policy", "choice", "omni", "How instances are chosen.", "instances",
           choices=SCHEDULE_POLICIES, directive="omni_schedule_policy", doc=(
               "`omni` is predictive, cache-aware and holds requests.")),
    Option("prefill_queue_order", "choice", "sjf", "Order of held prefill requests.",
           "instances", choices=QUEUE_ORDERS, directive="omni_prefill_queue_order", doc=(
               "`sjf`: shortest predicted work first, with aging.")),
    Option("model_path", "special", None, "Model directory (tokenizer, chat template).",
           "instances", metavar="DIR", directive="omni_model_path", default_doc="none",
           doc=(
               "Must exist; rendered only when given. With it, `omni-ctl start` "
               "runs the tokenizer service (docs/tokenizer.md) and the proxy "
               "tokenizes every text prompt and chat request once through it: "
               "block hashes, prefix matching and token counts use the real "
               "ids.")),
    Option("tokenizer_workers", "int", 0, (
        "Tokenizer service worker processes (0: one per nginx worker)."), "instances",
           metavar="N", minimum=0, renders="`# omni-ctl: tokenizer --workers N`",
           doc=(
               "Used with `--model-path`. With more than one, each worker listens on "
               "`tokenizer.sock.I` of its own and the `omni_tokenizer` upstream "
               "hashes `$omni_conversation` (a chat request's messages through the "
               "first user message) to them, so every turn of a conversation finds "
               "its earlier turns in one worker's reuse cache.")),
    Option("chat_template", "special", None, (
        "Jinja chat template replacing the model's, as the engines' "
        "--chat-template."), "instances", metavar="FILE", default_doc="the model's",
           renders="`# omni-ctl: tokenizer --chat-template FILE`",
           doc="Must exist; used with `--model-path`; give the engines the same file."),
    Option("tokenize_timeout", "duration", "50ms", (
        "Deadline of the tokenizer service's answer (bare number: ms); past it the "
        "request is scheduled on the estimate."), "instances", metavar="T", unit="ms",
           directive="omni_tokenize_timeout", doc=(
               "Counted in `omni_tokenize_fallback_total{reason=\"timeout\"}`; the "
               "request is never refused for it.")),
    Option("tokenize_timeout_per_kb", "duration", "1ms", (
        "Added to --tokenize-timeout per KB of request body (bare number: ms)."),
           "instances", metavar="T", unit="ms", directive="omni_tokenize_timeout_per_kb"),
    Option("token_reuse", "choice", "auto", (
        "Send the tokenizer's ids to the engines (auto) or the request as sent (off)."),
           "instances", choices=("auto", "off"), directive="omni_token_reuse", doc=(
               "With `--model-path`. `/v1/completions`: `prompt` becomes the ids on "
               "both legs (every mode; not with `echo`); chat in parallel mode "
               "(SGLang): `input_ids` next to `messages` when the service says "
               "SGLang renders the same ids; chat in sequential mode (vLLM): the "
               "decode leg's `kv_transfer_params.prompt_token_ids`. The client's "
               "answer is unchanged in form.")),
    Option("tokenize_max_body", "size", "64m", (
        "Largest body sent to the tokenizer service; larger ones are scheduled on "
        "the estimate."), "instances", metavar="SIZE", minimum=1,
           directive="omni_tokenize_max_body", doc=(
               "Keep it at most the service's `--max-body-mb` (64 MB); counted as "
               "`too_large`.")),
    Option("tokenize_max_inflight", "int", 4, (
        "Tokenizer requests one nginx worker has in flight at most; past it a request "
        "is scheduled on the estimate at once (0: no limit)."), "instances", metavar="N",
           minimum=0, directive="omni_tokenize_max_inflight", doc=(
               "Counted as `busy`. It keeps requests from queueing at the service "
               "behind more work than their deadline allows (a service whose queue "
               "is longer than the deadline spends its time on answers nobody waits "
               "for) while letting bursts through: with the default one tokenizer "
               "worker per nginx worker, 4 never turned a request away on the "
               "Mooncake trace, and under a closed-loop overload kept 0.53-0.72x of "
               "the requests/s without tokenization (0.02-0.13x with no limit; "
               "docs/benchmarks.md section 9). With more tokenizer workers than "
               "nginx workers, raise it in proportion.")),
    Option("tokenize_learn_max", "size", "64k", (
        "Largest chat answer the proxy sends the tokenizer service to learn "
        "(0: no answer learning)."), "instances", metavar="SIZE", minimum=0,
           directive="omni_tokenize_learn_max", doc=(
               "With `--model-path` and `--token-reuse auto`: the answer's text, "
               "captured as it streams to the client, goes to the service worker "
               "that tokenized the request (a non-blocking datagram to "
               "`tokenizer.learn.N` in the prefix), which caches the conversation "
               "through it, so the next turn encodes only its new message. Longer "
               "answers are not sent (`omni_tokenize_learn_dropped_total"
               "{reason=\"too_large\"}`); at most 1048560.")),
    # -- the scheduler
    Option("max_batch_num_token", "int", 16384, "Prefill tokens per instance batch.",
           "scheduler", metavar="N", minimum=1, directive="omni_max_batch_num_token", doc=(
               "About the engines' `max_num_batched_tokens`: an instance with prefill "
               "tokens in flight counts as busy for a request that would take it "
               "past this.")),
    Option("prefill_step_tokens", "int", 8192, (
        "The prefill engines' step budget: vLLM's max_num_batched_tokens, "
        "SGLang's chunked_prefill_size (0: unknown)."), "scheduler", metavar="N",
           minimum=0, maximum=16777216, directive="omni_prefill_step_tokens", doc=(
               "An instance over `--max-batch-num-token` takes the next request "
               "`--hold-slack` before its work is predicted to end when the "
               "engine's last step of that work (its tokens modulo this budget) "
               "is long enough for the request to arrive during that step, not "
               "before it: the next prefill then starts without the handover's "
               "idle (docs/scheduler.md, \"The last step\"). On the Mooncake "
               "trace it lowers the mean TTFT and raises the p99 (a request bound "
               "before the end waits when that work overruns its prediction). 0 "
               "keeps such an instance busy until its tokens come back.")),
    Option("prefill_max_num_seqs", "int", 16, "Requests in flight per prefill instance.",
           "scheduler", metavar="N", minimum=1, directive="omni_prefill_max_num_seqs"),
    Option("decode_max_num_seqs", "int", 256, "Requests in flight per decode instance.",
           "scheduler", metavar="N", minimum=1, directive="omni_decode_max_num_seqs"),
    Option("prefill_starvation_timeout", "duration", "5000ms", (
        "A held prefill request goes first once its wait plus its predicted "
        "prefill reaches this (bare number: ms)."), "scheduler",
           metavar="T", unit="ms", directive="omni_prefill_starvation_timeout", doc=(
               "The TTFT it would have if it started now: a long prompt starves "
               "as much earlier as it takes longer (with `--prefill-queue-order "
               "fcfs`, the wait alone). Among several, the oldest (it minimises "
               "the largest TTFT among them). Under a backlog deeper than this "
               "(held prefill work per usable instance), the bound is 125% of "
               "the backlog instead, so shortest first goes on while it drains "
               "(`omni_starvation_bound_seconds`), and the order's aging is "
               "weakened as much, timeout / bound (`omni_queue_aging`). With "
               "SLOs, a request past its deadline is starved this long after "
               "it.")),
    Option("queue_max", "int", 4096, "Held requests before new ones get 429.", "scheduler",
           metavar="N", minimum=1, directive="omni_queue_max"),
    Option("queue_timeout", "duration", "600s", "Longest a request is held before 503.",
           "scheduler", metavar="T", directive="omni_queue_timeout"),
    Option("request_timeout", "duration", "600s", (
        "Deadline of a request through the queue and both legs (0: none)."), "scheduler",
           metavar="T", minimum=0, directive="omni_request_timeout", doc=(
               "Past it the request gets 504, or one SSE error event when its stream "
               "had started; its legs are cancelled. A client may lower it (never "
               "raise it) with the header `X-Omni-Request-Timeout: <ms>`. The default "
               "is the OpenAI clients' own default timeout (600 s): no request waits "
               "longer on a hung or stalled engine, and none the clients would still "
               "wait for is cut. Raise it (or 0) for longer generations.")),
    Option("decode_max_tokens", "int", 0, (
        "KV-token budget per decode instance (prompt + expected output of the work "
        "in flight; 0: none)."), "scheduler", metavar="N", minimum=0,
           directive="omni_decode_max_tokens",
           doc="With 0 only `--decode-max-num-seqs` limits a decode instance."),
    Option("engine_tokenize_ns", "int", 4400, (
        "The engines' tokenization time per prompt token sent to them as text, in "
        "ns: such a request may be sent that much before its instance frees."),
           "scheduler", metavar="NS", minimum=0, maximum=1_000_000,
           directive="omni_engine_tokenize_ns", doc=(
               "An engine tokenizes a text prompt before it can schedule it; sent "
               "when its instance frees, the instance idles meanwhile, so a held text "
               "request is released up to `prompt tokens x NS` earlier than "
               "`--hold-slack` alone allows, and its tokenization overlaps the work "
               "ahead of it. Prompts that go as token ids (a token-id prompt, or "
               "`--model-path` with `--token-reuse auto`) get no allowance. The "
               "default is a published vLLM figure (164 ms for about 37k tokens); 0 "
               "turns it off (docs/benchmarks.md section 11).")),
    Option("max_model_len", "int", 0, (
        "The engines' context length in tokens: a prompt of that many tokens or "
        "more is answered 400 at once (0: not checked)."), "scheduler", metavar="N",
           minimum=0, directive="omni_max_model_len", doc=(
               "Set it to the smallest `--max-model-len` (vLLM) or `--context-length` "
               "(SGLang) of the engines. Checked only where the proxy knows the exact "
               "count: a token-id prompt, or one the tokenizer service counted (a "
               "text prompt on the 4-bytes estimate goes on and the engine judges). "
               "The answer is the engine's own: 400, \"This model's maximum context "
               "length is N tokens. However, your request has M input tokens.\"; "
               "without it such a request is held as the largest job of the queue "
               "before the engine refuses it.")),
    Option("hold_slack", "duration", "20ms", (
        "Release a request to an instance predicted busy for at most this long "
        "(bare number: ms)."), "scheduler", metavar="T", unit="ms",
           directive="omni_hold_slack", doc=(
               "Longer, and it is held (or goes elsewhere if that finishes sooner).")),
    Option("slo_ttft", "duration", "0", (
        "Time-to-first-token objective of every request (bare number: ms; 0: "
        "none)."), "scheduler", metavar="T", unit="ms", minimum=0,
           directive="omni_slo_ttft", default_doc="0 (none)", doc=(
               "With an objective the held requests are released so that as many "
               "as possible meet it (docs/scheduler.md, \"SLO-aware release\"); "
               "a request that can no longer meet it goes after those that can.")),
    Option("slo_tpot", "duration", "0", (
        "Time-per-output-token objective of every request (bare number: ms; 0: "
        "none)."), "scheduler", metavar="T", unit="ms", minimum=0,
           directive="omni_slo_tpot", default_doc="0 (none)", doc=(
               "Decode goes to the least loaded instance predicted to meet it.")),
    Option("slo_max", "duration", "60s", (
        "Largest objective a request may ask for with the X-Omni-SLO-TTFT and "
        "X-Omni-SLO-TPOT headers (ms); larger ones are cut to this."), "scheduler",
           metavar="T", unit="ms", directive="omni_slo_max", doc=(
               "A header overrides `--slo-ttft` / `--slo-tpot` for its request.")),
    Option("slo_reject", "choice", "off", (
        "Refuse a request at once (429 with Retry-After) when the queue cannot "
        "meet any objective."), "scheduler", choices=("on", "off"),
           directive="omni_slo_reject", doc=(
               "Only a request that could meet its objective on an idle instance, "
               "cannot even if released first, while no queued request can meet "
               "its own.")),
    Option("block_size", "int", 256, (
        "Tokens per block of the proxy's prefix index (text: 4 bytes per token)."),
           "scheduler", metavar="N", minimum=1, directive="omni_block_size", doc=(
               "A cached prefix is counted to within one block; fewer, larger blocks "
               "are less work per request.")),
    Option("index_max_tokens", "int", 131072, (
        "Prompt tokens indexed per request (the leading ones)."), "scheduler",
           metavar="N", minimum=0, directive="omni_index_max_tokens", doc=(
               "Bounds the index's work per request whatever the prompt's size. A "
               "longer prompt whose indexed part is all cached is assumed to need "
               "the rest computed.")),
    Option("cache_blocks", "int", 0, (
        "Prefix-cache capacity assumed per instance, in index blocks (0: share the "
        "index's capacity)."), "scheduler", metavar="N", minimum=0,
           directive="omni_cache_blocks", doc=(
               "Set it to the engines' KV capacity: vLLM logs `# GPU blocks: G` at "
               "start, so N = G x the engine's block size / `--block-size` (the "
               "simulator's `llama3-8b-h100` preset: 26000 x 16 / 256 = 1625). Left "
               "at 0, the index keeps prefixes the engines have evicted and predicts "
               "hits that do not happen.")),
    Option("cache_ttl", "duration", "600s", (
        "How long the index assumes a dispatched prefix stays cached."), "scheduler",
           metavar="T", directive="omni_cache_ttl"),
    Option("zone_size", "size", "64m", "Shared-memory zone size.", "scheduler",
           metavar="SIZE", minimum=1 << 20, directive="omni_zone_size", doc=(
               "The one zone holds instances, queues and the prefix index; at least "
               "`1m`.")),
    # -- the front door
    Option("engine_routes", "special", "/v1/models,/version", (
        "Read-only engine routes (GET and HEAD) passed to the decode tier, comma "
        "separated; every other path gets 404."), "front", metavar="PATH,...",
           renders="`location = PATH` with `omni_methods GET HEAD`", doc=(
               "Exact paths. `/v1/completions` and `/v1/chat/completions` (POST) are "
               "always served; `/health` is the proxy's own. Engine admin "
               "endpoints (`/flush_cache`, `/sleep`, ...) stay unreachable unless "
               "listed. `none`: no engine route.")),
    Option("api_key", "special", None, (
        "Require `Authorization: Bearer KEY` on /v1/* (compared in constant time)."),
           "front", metavar="KEY", renders="`omni_api_key_file PREFIX/api_key`",
           default_doc="none", doc=(
               "Written to `PREFIX/api_key` (mode 0600), not into nginx.conf. A "
               "request without it or with another key gets 401 with "
               "`WWW-Authenticate`. Printable ASCII, no spaces.")),
    Option("api_key_file", "special", None, "File holding the API key (instead of --api-key).",
           "front", metavar="PATH", renders="`omni_api_key_file PATH`", default_doc="none",
           doc="Read by nginx when it loads the config; one line."),
    Option("status_allow", "special", "127.0.0.1,::1", (
        "Addresses or networks allowed to read /omni/status and /metrics "
        "(`all`: any)."), "front", metavar="NET,...",
           renders="`allow NET; deny all;` in `/omni/status` and `/metrics`", doc=(
               "Others get 403.")),
    Option("status_token", "special", None, (
        "Also require `Authorization: Bearer TOKEN` for /omni/status, /metrics and the "
        "agent's /omni/ingest."),
           "front", metavar="TOKEN", renders="`omni_api_key_file PREFIX/status_token`",
           default_doc="none", doc="Written to `PREFIX/status_token` (mode 0600)."),
    Option("status_token_file", "special", None, (
        "File holding the status token (instead of --status-token)."), "front",
           metavar="PATH", renders="`omni_api_key_file PATH`", default_doc="none"),
    # -- listening, workers, processes
    Option("listen_host", "special", "127.0.0.1", "Address to listen on (0.0.0.0 for all).",
           "listen", metavar="IP", seed=True, renders="`listen`"),
    Option("listen_port", "int", 8080, "Port to listen on.", "listen", metavar="PORT",
           minimum=1, maximum=65535, seed=True, renders="`listen` (`reuseport backlog=4096`)"),
    Option("core_num", "int", 1, "Worker processes, one pinned per core.", "listen",
           metavar="N", minimum=1, seed=True, renders="`worker_processes`"),
    Option("start_core_index", "int", 0, (
        "First core; workers use cores N..N+core-num-1."), "listen", metavar="N",
           minimum=0, seed=True, renders="`worker_cpu_affinity`", doc=(
               "Cores the machine does not have are an error that says how many it "
               "has; `--allow-missing-cores` makes it a warning.")),
    Option("worker_connections", "int", 4096, (
        "Connections per worker (clients and upstreams)."), "listen", metavar="N",
           minimum=32, renders="`worker_connections`"),
    Option("user", "special", None, "Worker user when nginx starts as root.", "listen",
           metavar="NAME", renders="`user`", default_doc="nginx's own (nobody)", doc=(
               "Left unset, nginx's built-in unprivileged user: nginx creates the "
               "temp directories in the prefix for it, and the prefix must be "
               "searchable by it. `--user root` keeps workers root (a prefix "
               "private to root). A user without a group of its own name runs "
               "with its primary group (`user nobody nogroup;`).")),
    # -- upstreams and timeouts
    Option("connect_timeout", "duration", "10s", "Upstream connect timeout.", "upstream",
           metavar="T", renders="`proxy_connect_timeout` of both legs and engine routes"),
    Option("prefill_read_timeout", "duration", "600s", "Read/send timeout of the prefill leg.",
           "upstream", metavar="T",
           renders="`proxy_read_timeout`, `proxy_send_timeout` of the prefill leg"),
    Option("decode_read_timeout", "duration", "600s", (
        "Read/send timeout of the decode leg and of engine routes."), "upstream",
           metavar="T", renders="`proxy_read_timeout`, `proxy_send_timeout` of the decode "
           "leg and engine routes", doc="Long generations stream for minutes."),
    Option("keepalive", "int", 256, "Idle upstream connections kept per worker and tier.",
           "upstream", metavar="N", minimum=1, renders="`keepalive` in each upstream"),
    Option("upstream_keepalive_timeout", "duration", "4s", (
        "How long an idle engine connection is kept for reuse."), "upstream", metavar="T",
           renders="`keepalive_timeout` in each upstream", doc=(
               "Shorter than the engines' own idle timeout (uvicorn: 5 s), so nginx never "
               "sends a request on a connection the engine is closing; a request that "
               "fails on a reused connection anyway is retried on another connection.")),
    Option("max_retries", "int", 2, (
        "Other instances a failed leg is tried on before the client gets 502/504."),
           "upstream", metavar="N", minimum=0, maximum=64,
           renders="`proxy_next_upstream_tries` (N+1) of both legs", doc=(
               "A leg is retried when it could not connect, timed out or got a 5xx "
               "answer, only before anything was sent to the client: a prefill on another "
               "prefill instance, a decode on another decode instance with the same "
               "`kv_transfer_params`. A parallel-mode prefill is never retried (the decode "
               "leg was told its address).")),
    Option("passive_health_on", "choice", "error,timeout,5xx", (
        "Failed tries that count against an instance's health."), "upstream",
           metavar="KINDS", choices=("error,timeout,5xx", "error,timeout", "error,5xx",
                                     "timeout,5xx", "error", "timeout", "5xx", "none"),
           directive="omni_passive_health_on", doc=(
               "error: connect and read errors; timeout: connect/read timeouts; 5xx: an "
               "engine's 5xx answer. --max-fails of them within --fail-timeout rest the "
               "instance; a success clears the count. Retries happen either way.")),
    Option("max_fails", "int", 3, (
        "Failures within --fail-timeout that mark an instance down (0: never)."),
           "upstream", metavar="N", minimum=0, renders="`max_fails=` on every `server`"),
    Option("fail_timeout", "duration", "10s", (
        "Window for --max-fails and how long a failed instance rests."), "upstream",
           metavar="T", renders="`fail_timeout=` on every `server`"),
    Option("client_body_timeout", "duration", "60s", (
        "Longest pause between two reads of a client's body."), "upstream", metavar="T",
           renders="`client_body_timeout`", doc=(
               "A client slower than this is answered 408 (or its connection closed) and "
               "leaves nothing behind.")),
    Option("max_body_size", "size", "64m", "Largest request body (0: no limit).",
           "upstream", metavar="SIZE", renders="`client_max_body_size`",
           doc="Larger bodies get 413."),
    # -- files
    Option("prefix", "special", None, (
        "Directory for the pid file, logs and temp files."), "files", metavar="DIR",
           seed=True, default_doc="the conf file's directory", doc=(
               "Every path in the file is absolute and inside the prefix (or the log "
               "paths given), so `nginx -t -p PREFIX -c PATH` works as a normal user.")),
    Option("log_file", "special", None, "nginx error log.", "files", metavar="PATH",
           seed=True, default_doc="PREFIX/error.log", renders="`error_log`"),
    Option("log_level", "choice", "warn", "error_log level.", "files", seed=True,
           choices=LOG_LEVELS, renders="`error_log`"),
    Option("access_log_file", "special", None, "Access log in the `omni` format.", "files",
           metavar="PATH|off", seed=True, default_doc="PREFIX/access.log",
           renders="`access_log PATH omni`", doc="`off` disables it."),
    Option("module_dir", "special", None, "Where ngx_http_omni_module.so is.", "files",
           metavar="DIR", default_doc="$OMNI_MODULE_DIR or build/modules",
           renders="`load_module`"),
    # -- the KV-event agent (docs/agent.md): `omni-ctl start` runs it when
    #    the engines' publishers are given
    Option("kv_events_port", "int", 0, (
        "KV-event publisher port on every instance's host (0: none)."), "agent",
           metavar="P", minimum=0, maximum=65535, renders=_AGENT_LINE, doc=(
               "With this or `--kv-events-port-offset`, `omni-ctl start` runs "
               "`omni-ctl agent --push` to the proxy's `/omni/ingest`, and "
               "`omni-ctl stop` stops it.")),
    Option("kv_events_port_offset", "int", 0, (
        "KV-event publisher port = instance port + N (0: none)."), "agent",
           metavar="N", minimum=0, maximum=65535, renders=_AGENT_LINE),
    Option("kv_replay_port", "int", 0, (
        "KV-event replay port on every instance's host (0: none)."), "agent",
           metavar="P", minimum=0, maximum=65535, renders=_AGENT_LINE),
    Option("kv_replay_port_offset", "int", 0, (
        "KV-event replay port = instance port + N (0: none)."), "agent",
           metavar="N", minimum=0, maximum=65535, renders=_AGENT_LINE),
    Option("kv_dp_ranks", "int", 1, (
        "Data-parallel ranks per engine: rank r publishes on port + r."), "agent",
           metavar="N", minimum=1, maximum=1024, renders=_AGENT_LINE),
)

# the agent options, as `omni-ctl agent` takes them
AGENT_FLAGS = {"kv_events_port": "--kv-events-port",
               "kv_events_port_offset": "--kv-events-port-offset",
               "kv_replay_port": "--kv-replay-port",
               "kv_replay_port_offset": "--kv-replay-port-offset",
               "kv_dp_ranks": "--dp-ranks"}

OPTION = {o.name: o for o in OPTIONS}

# Option defaults (the values used when an option is not given).
DEFAULTS = {o.name: o.default for o in OPTIONS}

# routes the proxy schedules itself (POST only)
SCHEDULED_ROUTES = ("/v1/completions", "/v1/chat/completions")
# the proxy's own locations: never an engine route
PROXY_ROUTES = SCHEDULED_ROUTES + ("/health", "/omni/status", "/metrics",
                                   "/omni/ingest")

# Characters that would need quoting or change meaning in nginx.conf
# (`$` starts a variable in log paths, `#` a comment, `;{}` end directives).
_UNSAFE_PATH = re.compile(r"""[\s;{}"'\\$#]""")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_DURATION = re.compile(r"^(\d+)(ms|s|m|h)?$")
_SIZE = re.compile(r"^(\d+)([kKmMgG]?)$")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_ROUTE = re.compile(r"^/[A-Za-z0-9/._~-]*$")
# what a client can send in an Authorization header, minus quoting trouble
_SECRET = re.compile(r"^[\x21-\x7e]+$")


class ConfError(click.ClickException):
    """A bad option value; the message names the option and the value."""

    def __init__(self, option: str, value, reason: str):
        self.option = option
        self.value = value
        super().__init__(f"invalid {option} {str(value)!r}: {reason}")


class NginxTestError(click.ClickException):
    """`nginx -t` rejected a rendered configuration."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str                       # IPv4 literal, compressed IPv6, or a name
    port: int
    bootstrap_port: int | None = None

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def address(self) -> str:
        """host:port as nginx writes a peer's name ([v6]:port)."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class _ProxyConfBase:
    """What every ProxyConf derives from its fields."""

    @property
    def module_path(self) -> Path:
        return paths.module_path(self.module_dir)

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def listen(self) -> str:
        if ":" in self.listen_host:
            return f"[{self.listen_host}]:{self.listen_port}"
        return f"{self.listen_host}:{self.listen_port}"

    @property
    def user_directive(self) -> str | None:
        """The `user` directive's arguments: the name, and its primary group
        when no group has the user's name (nginx takes a group of that name
        when given none, and refuses to start without one: `nobody` on
        Debian, whose group is `nogroup`)."""
        import grp
        import pwd
        if not self.user:
            return None
        try:
            grp.getgrnam(self.user)
            return self.user
        except KeyError:
            pass
        try:
            return f"{self.user} {grp.getgrgid(pwd.getpwnam(self.user).pw_gid).gr_name}"
        except KeyError:
            return self.user        # unknown here: nginx says so where it runs

    @property
    def agent_args(self) -> tuple[str, ...]:
        """`omni-ctl agent` options for this config; () when the engines'
        KV-event publishers are not given (no agent)."""
        if not (self.kv_events_port or self.kv_events_port_offset):
            return ()
        args = []
        for name, flag in AGENT_FLAGS.items():
            value = getattr(self, name)
            if value and not (name == "kv_dp_ranks" and value == 1):
                args += [flag, str(value)]
        return tuple(args)

    @property
    def api_key_path(self) -> Path | None:
        """The file nginx reads the API key from (None: no key required)."""
        return self._secret_path("api_key")

    @property
    def status_token_path(self) -> Path | None:
        return self._secret_path("status_token")

    def _secret_path(self, name: str) -> Path | None:
        if getattr(self, name) is not None:
            return self.prefix / name
        return getattr(self, f"{name}_file")

    def secrets(self) -> dict[Path, str]:
        """Files gen-conf writes (mode 0600) next to the config."""
        return {self.prefix / name: getattr(self, name) + "\n"
                for name in ("api_key", "status_token") if getattr(self, name) is not None}

    @property
    def tokenizer_worker_count(self) -> int:
        """The tokenizer service's workers: --tokenizer-workers, else one per
        nginx worker."""
        return self.tokenizer_workers or len(self.cores)

    def tokenizer_args(self) -> str | None:
        """The arguments of `omni-ctl tokenizer` that `omni-ctl start` reads
        from the `# omni-ctl: tokenizer` line; None without a model path."""
        if self.model_path is None:
            return None
        args = []
        n = self.tokenizer_worker_count
        if self.tokenizer_workers or n > 1:
            args += ["--workers", str(n)]
        if n > 1:
            # one socket per worker: nginx hashes a conversation to one
            args += ["--worker-sockets"]
        if self.chat_template is not None:
            args += ["--chat-template", str(self.chat_template)]
        return shlex.join(args)

    def omni_directives(self) -> list[tuple[str, str]]:
        """(directive, value) of every omni_* http directive, in table order."""
        out = []
        for opt in OPTIONS:
            if opt.directive is None:
                continue
            value = getattr(self, opt.field)
            if value is None:
                continue
            out.append((opt.directive,
                        format_duration(value) if opt.kind == "duration" else str(value)))
        return out


# the fields of options make_conf validates itself (kind "special"), and
# what they become
_SPECIAL_FIELDS = [
    ("conf_file", Path), ("prefix", Path),
    ("prefill", tuple), ("decode", tuple),      # of Endpoint
    ("listen_host", str), ("cores", tuple),
    ("model_path", "Path | None"), ("chat_template", "Path | None"), ("log_file", Path),
    ("access_log_file", "Path | None"), ("module_dir", Path), ("user", "str | None"),
    ("engine_routes", tuple), ("status_allow", tuple),   # () allows all
    ("api_key_file", "Path | None"), ("status_token_file", "Path | None"),
    ("api_key", "str | None", dataclasses.field(repr=False)),
    ("status_token", "str | None", dataclasses.field(repr=False)),
]
assert {f[0] for f in _SPECIAL_FIELDS} >= {o.name for o in OPTIONS if o.kind == "special"} - {
    "prefill_endpoints", "decode_endpoints"}

_KIND_TYPES = {"int": int, "duration": int, "size": str, "choice": str}

ProxyConf = dataclasses.make_dataclass(
    "ProxyConf",
    _SPECIAL_FIELDS + [(o.field, _KIND_TYPES[o.kind]) for o in OPTIONS
                       if o.kind != "special"],
    bases=(_ProxyConfBase,), frozen=True,
    namespace={"__doc__": "Validated gen-conf options, ready to render (one field "
                          "per option of OPTIONS; durations in ms as NAME_ms)."})


# ---------------------------------------------------------------------------
# parsing of single values


def cpu_count() -> int:
    """Cores on this machine (OMNI_CPU_COUNT overrides, for tests)."""
    env = os.environ.get("OMNI_CPU_COUNT")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ConfError("OMNI_CPU_COUNT", env, "must be an integer") from None
        if n < 1:
            raise ConfError("OMNI_CPU_COUNT", env, "must be at least 1")
        return n
    return os.cpu_count() or 1


def parse_int(option: str, value, minimum: int | None = None,
              maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise ConfError(option, value, "must be an integer")
    try:
        n = int(str(value).strip(), 10)
    except ValueError:
        raise ConfError(option, value, "must be an integer") from None
    if minimum is not None and n < minimum:
        if maximum is not None:
            raise ConfError(option, value, f"must be between {minimum} and {maximum}")
        raise ConfError(option, value, f"must be at least {minimum}")
    if maximum is not None and n > maximum:
        raise ConfError(option, value, f"must be between {minimum} and {maximum}")
    return n


def parse_duration(option: str, value, default_unit: str = "s",
                   minimum_ms: int = 1) -> int:
    """nginx-style duration ("600s", "2000ms", "10m", "1h"; a bare number is
    in default_unit) -> milliseconds."""
    m = _DURATION.match(str(value).strip())
    if not m:
        raise ConfError(option, value, "must be a duration such as 500ms, 30s, 10m or 1h")
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[m.group(2) or default_unit]
    ms = int(m.group(1)) * scale
    if ms < minimum_ms:
        raise ConfError(option, value, f"must be at least {minimum_ms}ms")
    return ms


def format_duration(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def parse_size(option: str, value, minimum: int = 0) -> str:
    """nginx-style size ("64m", "512k", bytes) -> normalized text."""
    m = _SIZE.match(str(value).strip())
    if not m:
        raise ConfError(option, value, "must be a size such as 512k, 64m or 1g")
    unit = m.group(2).lower()
    nbytes = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]
    if nbytes < minimum:
        raise ConfError(option, value, f"must be at least {minimum >> 10}k")
    return f"{int(m.group(1))}{unit}"


def parse_path(option: str, value, base: Path | None = None) -> Path:
    text = str(value)
    if not text.strip():
        raise ConfError(option, value, "must not be empty")
    if _UNSAFE_PATH.search(text):
        raise ConfError(option, value,
                        "must not contain spaces, quotes, ';', '{', '}', '$', '#' or '\\'")
    path = Path(text)
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return Path(os.path.normpath(path))


def parse_endpoint(option: str, text: str) -> Endpoint:
    """H:P, [V6]:P, optionally @BOOTSTRAP_PORT."""
    item = text.strip()
    hostport, at, boot = item.partition("@")
    bootstrap = None
    if at:
        bootstrap = _port(option, item, boot, "bootstrap port")
    if hostport.startswith("["):
        host, sep, port = hostport[1:].partition("]:")
        if not sep:
            raise ConfError(option, item, "expected [IPv6]:PORT")
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise ConfError(option, item, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = hostport.rpartition(":")
        if not sep or not host:
            raise ConfError(option, item, "expected HOST:PORT (e.g. 127.0.0.1:8001)")
        if ":" in host:
            raise ConfError(option, item, "write IPv6 addresses in brackets, e.g. [::1]:8001")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise ConfError(option, item, f"{host!r} is not an IPv4 address") from None
        elif not _HOSTNAME.match(host):
            raise ConfError(option, item, f"{host!r} is not a valid host name")
    return Endpoint(host, _port(option, item, port, "port"), bootstrap)


def _port(option: str, item: str, text: str, what: str) -> int:
    if not text.isdigit():
        raise ConfError(option, item, f"{what} {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfError(option, item, f"{what} {port} is out of range (1-65535)")
    return port


def parse_endpoints(option: str, value) -> tuple[Endpoint, ...]:
    """A comma-separated list (or a list of strings); '' is an empty list."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    if isinstance(value, str) and not value.strip():
        return ()
    endpoints = []
    seen = set()
    for raw in items:
        if not str(raw).strip():
            raise ConfError(option, value, "has an empty entry (stray comma?)")
        ep = parse_endpoint(option, str(raw))
        if ep.address in seen:
            raise ConfError(option, value, f"lists {ep.address} twice")
        seen.add(ep.address)
        endpoints.append(ep)
    return tuple(endpoints)


def parse_listen_host(value) -> str:
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        raise ConfError("--listen-host", value,
                        "must be an IP address (127.0.0.1, 0.0.0.0, ::1, ::)") from None


def _choice(option: str, value, choices) -> str:
    if value not in choices:
        raise ConfError(option, value, f"must be one of {', '.join(choices)}")
    return value


# ---------------------------------------------------------------------------
# the whole option set


def parse_option(opt: Option, value):
    """Validate one option of a plain kind (not "special")."""
    if opt.kind == "int":
        return parse_int(opt.flag, value, opt.minimum, opt.maximum)
    if opt.kind == "duration":
        return parse_duration(opt.flag, value, opt.unit,
                              1 if opt.minimum is None else opt.minimum)
    if opt.kind == "size":
        return parse_size(opt.flag, value, opt.minimum or 0)
    if opt.kind == "choice":
        return _choice(opt.flag, value, opt.choices)
    raise AssertionError(f"{opt.name}: kind {opt.kind} is validated by make_conf")


def size_bytes(text: str) -> int:
    """A size as parse_size normalizes it ("64m") -> bytes."""
    m = _SIZE.match(text)
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


def directive_defaults() -> dict:
    """What /omni/status's "config" object shows when no omni_* directive is
    set: the option table's defaults, keyed by directive name without
    omni_ (durations in ms as NAME_ms, sizes in bytes)."""
    out = {}
    for opt in OPTIONS:
        if opt.directive is None or opt.default is None:
            continue
        key = opt.directive[len("omni_"):]
        value = parse_option(opt, opt.default)
        if opt.kind == "duration":
            key += "_ms"
        elif opt.kind == "size":
            value = size_bytes(value)
        out[key] = value
    return out


def parse_routes(value) -> tuple[str, ...]:
    opt = OPTION["engine_routes"]
    items = value.split(",") if isinstance(value, str) else list(value)
    if isinstance(value, str) and value.strip() in ("", "none"):
        return ()
    routes = []
    for raw in items:
        route = str(raw).strip()
        if not _ROUTE.match(route):
            raise ConfError(opt.flag, value, f"{route!r} is not a path such as /v1/models")
        if route in PROXY_ROUTES or route.startswith("/_omni/"):
            raise ConfError(opt.flag, value, f"{route} is the proxy's own route")
        if route in routes:
            raise ConfError(opt.flag, value, f"lists {route} twice")
        routes.append(route)
    return tuple(routes)


def parse_networks(value) -> tuple[str, ...]:
    """Addresses or networks for allow lines; () means everyone."""
    opt = OPTION["status_allow"]
    items = value.split(",") if isinstance(value, str) else list(value)
    if isinstance(value, str) and value.strip() == "all":
        return ()
    nets = []
    for raw in items:
        text = str(raw).strip()
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfError(opt.flag, value, f"{text!r} is not an address or network "
                            "(127.0.0.1, 10.0.0.0/8, ::1; or all)") from None
        nets.append(str(net.network_address) if net.num_addresses == 1 else str(net))
    if not nets:
        raise ConfError(opt.flag, value, "is empty (write `all` to allow everyone)")
    return tuple(nets)


def _secret(o: dict, name: str):
    """(literal, file) of a key given as --NAME or --NAME-file."""
    opt, file_opt = OPTION[name], OPTION[f"{name}_file"]
    literal, path = o[name], o[f"{name}_file"]
    if literal is not None and path is not None:
        raise ConfError(opt.flag, "***", f"give {opt.flag} or {file_opt.flag}, not both")
    if literal is not None and not _SECRET.match(str(literal)):
        # the value itself is not repeated: it is a secret
        raise ConfError(opt.flag, "***", "must be printable ASCII without spaces")
    if path is not None:
        path = parse_path(file_opt.flag, path)
        if not path.is_file():
            raise ConfError(file_opt.flag, path, "is not a file")
    return literal, path


def make_conf(nginx_conf_file, allow_missing_cores: bool = False,
              **options) -> ProxyConf:
    """Validate gen-conf options (names as in OPTIONS; None means "not
    given") into a ProxyConf.  Raises ConfError naming the first bad one.
    allow_missing_cores accepts cores this machine does not have (a config
    rendered for another machine)."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown gen-conf options: {', '.join(sorted(unknown))}")
    o = dict(DEFAULTS)
    o.update({k: v for k, v in options.items() if v is not None})

    if nginx_conf_file is None:
        raise ConfError("--nginx-conf-file", "", "is required")
    conf_file = parse_path("--nginx-conf-file", nginx_conf_file)
    if conf_file.is_dir():
        raise ConfError("--nginx-conf-file", nginx_conf_file, "is a directory")
    prefix = (parse_path("--prefix", o["prefix"]) if o["prefix"] is not None
              else conf_file.parent)
    if prefix.exists() and not prefix.is_dir():
        raise ConfError("--prefix", o["prefix"], "exists and is not a directory")

    # every option of a plain kind, in table order
    plain = {opt.field: parse_option(opt, o[opt.name])
             for opt in OPTIONS if opt.kind != "special"}

    pd_policy = plain["pd_policy"]
    prefill = parse_endpoints("--prefill-endpoints", o["prefill_endpoints"])
    decode = parse_endpoints("--decode-endpoints", o["decode_endpoints"])
    if not decode:
        raise ConfError("--decode-endpoints", o["decode_endpoints"],
                        f"--pd-policy {pd_policy} needs at least one decode endpoint")
    if pd_policy == "aggregated":
        if prefill:
            raise ConfError("--prefill-endpoints", o["prefill_endpoints"],
                            "--pd-policy aggregated uses --decode-endpoints only")
    elif not prefill:
        raise ConfError("--prefill-endpoints", o["prefill_endpoints"],
                        f"--pd-policy {pd_policy} needs at least one prefill endpoint")
    for ep in decode:
        if ep.bootstrap_port is not None:
            raise ConfError("--decode-endpoints", o["decode_endpoints"],
                            "@BOOTSTRAP ports belong to prefill endpoints")
    for ep in prefill:
        if ep.bootstrap_port is None:
            continue
        if pd_policy != "parallel":
            raise ConfError("--prefill-endpoints", o["prefill_endpoints"],
                            "@BOOTSTRAP ports are used with --pd-policy parallel only")
        if not ep.is_ip:
            raise ConfError("--prefill-endpoints", o["prefill_endpoints"],
                            f"{ep.host}: write an IP address with @BOOTSTRAP "
                            "(nginx matches bootstrap ports by resolved address)")

    listen_host = parse_listen_host(o["listen_host"])

    ncpu = cpu_count()
    start, num = plain["start_core_index"], plain["core_num"]
    if start >= ncpu and not allow_missing_cores:
        raise ConfError("--start-core-index", o["start_core_index"],
                        f"this machine has {ncpu} cores (0-{ncpu - 1})")
    if start + num > ncpu and not allow_missing_cores:
        raise ConfError("--core-num", o["core_num"],
                        f"cores {start}-{start + num - 1} requested but this machine "
                        f"has {ncpu} cores (0-{ncpu - 1})")

    model_path = None
    if o["model_path"] is not None:
        model_path = parse_path("--model-path", o["model_path"])
        if not model_path.is_dir():
            raise ConfError("--model-path", o["model_path"], "is not a directory")
    chat_template = None
    if o["chat_template"] is not None:
        chat_template = parse_path("--chat-template", o["chat_template"])
        if not chat_template.is_file():
            raise ConfError("--chat-template", o["chat_template"], "is not a file")

    log_file = (parse_path("--log-file", o["log_file"]) if o["log_file"] is not None
                else prefix / "error.log")
    if o["access_log_file"] == "off":
        access_log = None
    elif o["access_log_file"] is not None:
        access_log = parse_path("--access-log-file", o["access_log_file"])
    else:
        access_log = prefix / "access.log"

    module_dir = (parse_path("--module-dir", o["module_dir"]) if o["module_dir"] is not None
                  else paths.module_dir())

    user = o["user"]
    if user is not None and not _USER.match(str(user)):
        raise ConfError("--user", user, "must be a user name")

    engine_routes = parse_routes(o["engine_routes"])
    status_allow = parse_networks(o["status_allow"])
    api_key, api_key_file = _secret(o, "api_key")
    status_token, status_token_file = _secret(o, "status_token")

    return ProxyConf(
        conf_file=conf_file, prefix=prefix, prefill=prefill, decode=decode,
        listen_host=listen_host, cores=tuple(range(start, start + num)),
        model_path=model_path, chat_template=chat_template, log_file=log_file,
        access_log_file=access_log,
        module_dir=module_dir, user=user, engine_routes=engine_routes,
        status_allow=status_allow, api_key=api_key, api_key_file=api_key_file,
        status_token=status_token, status_token_file=status_token_file,
        **plain)


def unreachable_dir(conf: ProxyConf) -> Path | None:
    """When gen-conf runs as root (so nginx will too) and the workers run as
    another user: the first directory on the way to the prefix that this
    user cannot enter (nginx creates the temp directories for the workers'
    user, but cannot open the way to them; nor can they reach the
    tokenizer's socket there).  None when all is well or unknown (not root,
    the user does not exist here)."""
    import grp
    import pwd
    if os.geteuid() != 0:
        return None
    name = conf.user or "nobody"            # nginx's built-in worker user
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    if pw.pw_uid == 0:
        return None
    groups = set(os.getgrouplist(name, pw.pw_gid))
    groups |= {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return procfs.unsearchable_dir(conf.prefix, pw.pw_uid, groups)


# ---------------------------------------------------------------------------
# rendering


def template_dir() -> Path:
    """templates/ of a source checkout, else the installed package data."""
    here = paths.REPO_ROOT / "templates"
    if (here / "nginx.conf.j2").is_file():
        return here
    import importlib.resources
    return Path(str(importlib.resources.files("omni_ctl.templates")))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["duration"] = format_duration
    return env


def affinity_masks(cores) -> list[str]:
    """worker_cpu_affinity masks, one core per worker, all the same width."""
    width = max(cores) + 1
    return [format(1 << core, f"0{width}b") for core in cores]


def error_pages() -> list[dict]:
    pages = []
    for status, (sent, kind, message) in ERROR_PAGES.items():
        body = ('{"error": {"message": "%s", "type": "%s", "code": %d}}'
                % (message, kind, sent))
        pages.append({"status": status, "sent": sent, "body": body})
    return pages


def render_conf(conf: ProxyConf) -> str:
    """The complete nginx.conf text for a validated ProxyConf."""
    return _environment().get_template("nginx.conf.j2").render(
        version=__version__,
        conf=conf,
        prefix=str(conf.prefix),
        module_path=str(conf.module_path),
        sanitized=paths.build_info(conf.module_dir).get("debug") == "1",
        affinity=" ".join(affinity_masks(conf.cores)),
        error_pages=error_pages(),
        default_bootstrap_port=DEFAULT_BOOTSTRAP_PORT,
        scheduled_routes=SCHEDULED_ROUTES,
    )


# ---------------------------------------------------------------------------
# testing and writing


def nginx_test(conf_file, prefix, module_dir=None) -> str:
    """Run `nginx -t` on conf_file (with the sanitizer runtimes preloaded
    when the module is a debug build).  Returns nginx's output; raises
    NginxTestError with it on failure."""
    try:
        binary = paths.nginx_binary()
    except paths.NginxNotFound as exc:
        raise NginxTestError(str(exc)) from None
    os.makedirs(prefix, exist_ok=True)
    argv = [binary, "-t", "-p", str(prefix), "-c", str(conf_file)]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                             env=paths.nginx_env(module_dir), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NginxTestError(f"nginx -t did not finish in 60s: {' '.join(argv)}") from None
    output = (res.stdout + res.stderr).strip()
    if res.returncode != 0:
        raise NginxTestError(f"nginx -t failed for {conf_file}:\n{output}")
    return output


def backup_path(conf_file) -> Path:
    return Path(str(conf_file) + ".prev")


def install_file(path, text: str, backup: bool = True, mode: int = 0o644) -> Path | None:
    """Write text to path atomically (temp file + rename in the same
    directory).  The replaced file, when different, becomes path.prev.
    Returns the backup's path when one was made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        made = None
        if backup and path.is_file() and path.read_text() != text:
            bak = backup_path(path)
            os.replace(path, bak)
            made = bak
        os.replace(tmp, path)
        return made
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclasses.dataclass
class Generated:
    conf: ProxyConf
    text: str
    backup: Path | None
    check_output: str | None


def generate(nginx_conf_file, check: bool = False, allow_missing_cores: bool = False,
             **options) -> Generated:
    """gen-conf: validate, render, optionally `nginx -t` the candidate, then
    install it with a backup of the previous file.  Nothing is written when
    validation fails; a candidate that fails the test is removed."""
    conf = make_conf(nginx_conf_file, allow_missing_cores, **options)
    text = render_conf(conf)
    return Generated(conf, text, *install_checked(conf, text, check))


def install_checked(conf: ProxyConf, text: str, check: bool):
    """Install text as conf.conf_file, testing it first with `nginx -t`
    when check is set; returns (backup, nginx output)."""
    dirs = [("--nginx-conf-file", conf.conf_file.parent), ("--prefix", conf.prefix),
            ("--log-file", conf.log_file.parent)]
    if conf.access_log_file:
        dirs.append(("--access-log-file", conf.access_log_file.parent))
    created = []
    for option, d in dirs:
        missing = _missing_parents(d)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _remove_dirs(created)
            raise ConfError(option, d, f"cannot create directory: {exc.strerror}") from None
        created.extend(missing)
    write_secrets(conf)
    output = None
    if check:
        fd, tmp = tempfile.mkstemp(prefix=f".{conf.conf_file.name}.", suffix=".check",
                                   dir=conf.conf_file.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            output = nginx_test(tmp, conf.prefix, conf.module_dir)
        except NginxTestError:
            # leave no trace of a config that never got installed
            os.unlink(tmp)
            _remove_dirs(created)
            raise
        os.unlink(tmp)
    try:
        backup = install_file(conf.conf_file, text)
    except OSError as exc:
        raise ConfError("--nginx-conf-file", conf.conf_file,
                        f"cannot write: {exc.strerror}") from None
    return backup, output


def write_secrets(conf: ProxyConf) -> None:
    """The API key and status token given on the command line go to files
    (mode 0600) that nginx reads when it loads the config, never into the
    world-readable nginx.conf.  Written before `nginx -t` needs them."""
    for path, secret in conf.secrets().items():
        install_file(path, secret, backup=False, mode=0o600)


def _missing_parents(d: Path) -> list[Path]:
    """d and those of its parents that do not exist yet, outermost first."""
    missing = []
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    return missing[::-1]


def _remove_dirs(created: list[Path]) -> None:
    for d in created:
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
