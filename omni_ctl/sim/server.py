"""One simulated engine instance: its HTTP API, P/D transfer sides and faults.

Endpoints (both flavours): POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, GET /metrics, POST /reset_prefix_cache,
POST /flush_cache, GET /sim/stats, GET /sim/cache, POST /sim/fault,
POST /sim/stats/reset and the internal POST /sim/kv/pull (sequential P/D: the
decode instance pulls a prompt's KV from the prefill instance that holds it).
SGLang flavour adds POST /generate, GET /get_model_info, GET /get_server_info,
GET /health_generate, and every SGLang prefill instance listens on its
bootstrap port (pd.py).
"""

import asyncio
import concurrent.futures
import json
import random
import sys
import time
import uuid

import aiohttp
from aiohttp import web

from . import pd
from .engine import Engine, Seq, FINISHED
from .faults import Fault, FaultError
from .kvevents import KVEventPublisher
from .metrics import render
from ..tokenizer.core import template_kwargs
from .tokenizer import ChatTemplateError


class SimulatedDrop(ConnectionResetError):
    """Raised by a handler whose connection the `drop` fault closed."""


class SimError(Exception):
    def __init__(self, message, status=400, etype="invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.etype = etype


def error_body(message, etype, status):
    return {"error": {"message": message, "type": etype, "code": status}}


def error_response(message, status=400, etype="invalid_request_error", xrid=None):
    headers = {"X-Request-Id": xrid} if xrid else None
    return web.Response(status=status, text=json.dumps(error_body(message, etype, status)),
                        content_type="application/json", headers=headers)


def _json(data, status=200, headers=None):
    return web.Response(status=status, text=json.dumps(data),
                        content_type="application/json", headers=headers)


def _int_field(body, key, default=None, minimum=0):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise SimError(f"'{key}' must be an integer, got {v!r}")
    if v < minimum:
        raise SimError(f"'{key}' must be >= {minimum}, got {v}")
    return v


class _Waiter:
    """Wakes one HTTP handler when any of its requests makes progress."""

    __slots__ = ("fut", "flag", "only_finish")

    def __init__(self, only_finish=False):
        self.fut = None
        self.flag = False
        self.only_finish = only_finish

    def __call__(self, seq):
        if self.only_finish and seq.status != FINISHED:
            return
        self.flag = True
        f = self.fut
        if f is not None and not f.done():
            f.set_result(None)

    async def wait(self):
        if self.flag:
            self.flag = False
            return
        self.fut = asyncio.get_running_loop().create_future()
        try:
            await self.fut
        finally:
            self.fut = None
            self.flag = False


class Parsed:
    __slots__ = ("api", "prompts", "max_tokens", "min_tokens", "ignore_eos",
                 "stream", "include_usage", "eos_at", "ktp", "mode", "rooms",
                 "boot_hosts", "boot_ports", "text_prompts", "render")


def has_text(prompt):
    """Whether a completions prompt (or /generate text) holds text, which
    the tokenizer must encode, rather than token ids only."""
    return isinstance(prompt, str) or (
        isinstance(prompt, list) and any(isinstance(p, str) for p in prompt))


def _id_list(v, what):
    if not isinstance(v, list) or not v or not all(type(t) is int for t in v):
        raise SimError(f"'{what}' must be a non-empty array of token ids")
    return v


class Settings:
    """What every instance of one simulator process shares."""

    def __init__(self, preset, tokenizer, model_name="sim-model", speedup=1.0,
                 seed=0, salt=b"", eos_rate=0.0, default_max_tokens=16,
                 kv_transfer_timeout=60.0, bootstrap_timeout=30.0,
                 kv_events=False, kv_port_offset=100, kv_encoding=None,
                 kv_drop_rate=0.0, kv_topic="kv-events", kv_buffer=10000,
                 check_token_ids=True):
        self.preset = preset
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.speedup = speedup
        self.seed = seed
        self.salt = salt
        self.eos_rate = eos_rate
        self.default_max_tokens = default_max_tokens
        self.kv_transfer_timeout = kv_transfer_timeout
        self.bootstrap_timeout = bootstrap_timeout
        self.kv_events = kv_events
        self.kv_port_offset = kv_port_offset
        self.kv_encoding = kv_encoding
        self.kv_drop_rate = kv_drop_rate
        self.kv_topic = kv_topic
        self.kv_buffer = kv_buffer
        self.check_token_ids = check_token_ids
        self.session = None        # aiohttp.ClientSession for KV pulls
        self.instances = []        # every Instance of the process
        self._front = None         # the tokenizer thread (front_end())
        self.front_jobs = 0        # parses and parity checks queued or running there
        self.parity_jobs = set()   # parity checks not yet counted

    def front_end(self):
        """The one thread that runs this process's tokenizer.  Tokenizing a
        long prompt takes 0.1-0.2 s of CPU; on the event loop that would
        stall every instance's steps and answers (a real engine's front end
        does not stop its engine).  One thread: a fast tokenizer must not
        be called from two at once."""
        if self._front is None:
            self._front = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="sim-tokenizer")
        return self._front

    async def in_front_end(self, fn, *args):
        self.front_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.front_end(), fn, *args)
        finally:
            self.front_jobs -= 1

    async def settle(self):
        """Wait for the parity checks in flight now (not those that start
        meanwhile, so that a poll under load ends), so that counters read
        after a request's answer include its check."""
        jobs = list(self.parity_jobs)
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)

    def close(self):
        if self._front is not None:
            self._front.shutdown(wait=False, cancel_futures=True)
            self._front = None

    def client(self):
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0))
        return self.session


class Instance:
    def __init__(self, settings, name, role, engine_kind, host, port,
                 bootstrap_port=None, index=0):
        self.s = settings
        self.name = name
        self.role = role
        self.kind = engine_kind
        self.host = host
        self.port = port
        self.bootstrap_port = bootstrap_port
        self.index = index
        self.rng = random.Random(settings.seed * 1000003 + index)
        self.fault = Fault()
        self.dead = False
        self.tokenize_free_at = 0.0    # the front end's one tokenizer lane
        self.kv_pulls_served = 0
        self.kv_transfers_expired = 0
        self.transfers = {}        # remote_request_id -> (Seq, expiry handle)
        self._counter = 0
        self.engine = None
        self.engine_id = None
        self.publisher = None
        self.boot = None
        self._runner = None
        self._new_engine()

    # -- lifecycle ---------------------------------------------------------
    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def _new_engine(self):
        s = self.s
        self.engine = Engine(s.preset, s.tokenizer, s.salt, speedup=s.speedup,
                             seed=s.seed * 7919 + self.index, eos_rate=s.eos_rate)
        self.engine_id = f"{self.name}-{uuid.uuid4().hex[:16]}"
        self.engine.slow_factor = self.fault.factor if self.fault.mode == "slow" else 1.0

    def _app(self):
        app = web.Application(client_max_size=256 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/completions", self.h_completions)
        r.add_post("/v1/chat/completions", self.h_chat)
        r.add_get("/v1/models", self.h_models)
        r.add_get("/health", self.h_health)
        r.add_get("/metrics", self.h_metrics)
        r.add_post("/reset_prefix_cache", self.h_flush)
        r.add_post("/flush_cache", self.h_flush)
        r.add_get("/sim/stats", self.h_stats)
        r.add_post("/sim/stats/reset", self.h_stats_reset)
        r.add_get("/sim/cache", self.h_cache)
        r.add_post("/sim/fault", self.h_fault)
        r.add_post("/sim/kv/pull", self.h_kv_pull)
        if self.kind == "sglang":
            r.add_post("/generate", self.h_generate)
            r.add_get("/get_model_info", self.h_model_info)
            r.add_get("/get_server_info", self.h_server_info)
            r.add_get("/server_info", self.h_server_info)
            r.add_get("/health_generate", self.h_health)
        return app

    async def start(self):
        self.dead = False
        self.engine.start()
        s = self.s
        if s.kv_events:
            off = s.kv_port_offset
            enc = s.kv_encoding or ("map" if self.kind == "sglang" else "array")
            self.publisher = KVEventPublisher(
                self.host, self.port + off, self.port + 2 * off, topic=s.kv_topic,
                encoding=enc, drop_rate=s.kv_drop_rate,
                block_size=s.preset.block_size, buffer_size=s.kv_buffer,
                seed=s.seed * 31 + self.index)
            self.publisher.start()
            self.engine.event_sink = self.publisher.publish
        if self.bootstrap_port is not None:
            self.boot = pd.BootstrapServer(self, self.host, self.bootstrap_port)
            await self.boot.start()
        self._runner = web.AppRunner(self._app(), access_log=None,
                                     handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096,
                           reuse_address=True)
        await site.start()

    async def stop(self):
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.boot is not None:
            await self.boot.stop()
            self.boot = None
        await self.engine.stop()
        if self.publisher is not None:
            await self.publisher.stop()
            self.publisher = None
        for seq, handle in self.transfers.values():
            handle.cancel()
        self.transfers.clear()

    async def crash(self):
        """Fault `exit`: the engine dies, its KV and listeners are gone."""
        self.dead = True
        eng = self.engine
        for seq in list(eng.waiting) + list(eng.running) + list(eng.loading):
            eng.fail(seq, f"instance {self.name} exited")
        await self.stop()

    async def revive(self):
        self._new_engine()
        await self.start()

    # -- helpers -------------------------------------------------------------
    def _find(self, name):
        for inst in self.s.instances:
            if inst.name == name:
                return inst
        return None

    def stats(self, requests=0):
        e = self.engine
        pool = e.pool
        d = {
            "name": self.name, "role": self.role, "engine": self.kind,
            "url": self.url, "host": self.host, "port": self.port,
            "bootstrap_port": self.bootstrap_port, "engine_id": self.engine_id,
            "alive": not self.dead,
            "waiting": e.num_waiting, "running": len(e.running),
            "loading": len(e.loading),
            "bootstrapping": self.boot.pending() if self.boot else 0,
            "kv_transfers_held": len(self.transfers),
            "kv_usage": pool.usage(), "num_blocks": pool.num_blocks,
            "free_blocks": pool.num_free(), "cached_blocks": len(pool.cached),
            "block_size": pool.block_size,
            "prefix_cache_queried_tokens": e.prefix_queried,
            "prefix_cache_hit_tokens": e.prefix_hits,
            "requests_total": e.requests_total,
            "requests_finished": e.requests_finished,
            "errors_total": e.errors_total, "aborted_total": e.aborted_total,
            "tokenization_mismatches": e.token_parity_mismatches,
            "sim:token_parity_mismatch_total": e.token_parity_mismatches,
            "token_parity_checked_total": e.token_parity_checked,
            "tokenized_tokens_total": e.tokenized_tokens,
            "tokenize_skipped_tokens_total": e.tokenize_skipped_tokens,
            "tokenize_time_s": e.tokenize_time,
            "front_end_jobs": self.s.front_jobs,
            "prompt_tokens_total": e.prompt_tokens_total,
            "generation_tokens_total": e.generation_tokens_total,
            "max_waiting_seen": e.max_waiting_seen,
            "max_running_seen": e.max_running_seen,
            "preemptions_total": e.preemptions_total,
            "steps_total": e.steps_total, "busy_time_s": e.busy_time,
            "last_step": e.last_step,
            "kv_pulls_served": self.kv_pulls_served,
            "kv_transfers_expired": self.kv_transfers_expired,
            "kv_events": None, "fault": self.fault.as_dict(),
            "preset": self.s.preset.name, "speedup": self.s.speedup,
        }
        if self.publisher is not None:
            p = self.publisher
            d["kv_events"] = {"endpoint": p.endpoint, "replay_endpoint": p.replay_endpoint,
                              "encoding": p.encoding, "published": p.seq,
                              "sent": p.sent, "dropped": p.dropped}
        if requests:
            d["requests"] = [s.record() for s in list(e.recent)[-requests:]]
        return d

    # -- simple endpoints ------------------------------------------------------
    async def h_health(self, request):
        if self.fault.mode == "hang":
            await asyncio.Future()
        return web.Response(status=200)

    async def h_models(self, request):
        return _json({"object": "list", "data": [{
            "id": self.s.model_name, "object": "model", "created": int(time.time()),
            "owned_by": self.kind, "root": self.s.model_name, "parent": None,
            "max_model_len": self.s.preset.max_model_len}]})

    async def h_model_info(self, request):
        return _json({"model_path": self.s.model_name,
                      "tokenizer_path": self.s.tokenizer.name,
                      "is_generation": True, "preferred_sampling_params": None,
                      "weight_version": "default"})

    async def h_server_info(self, request):
        p = self.s.preset
        mode = self.role if self.role in ("prefill", "decode") else "null"
        return _json({
            "model_path": self.s.model_name, "served_model_name": self.s.model_name,
            "disaggregation_mode": mode,
            "disaggregation_bootstrap_port": self.bootstrap_port,
            "page_size": p.block_size, "max_total_num_tokens": p.num_blocks * p.block_size,
            "max_running_requests": p.max_num_seqs, "chunked_prefill_size": p.max_num_batched_tokens,
            "context_length": p.max_model_len, "version": "omni-sim",
            "internal_states": [{"last_gen_throughput": 0.0}]})

    async def h_metrics(self, request):
        await self.s.settle()
        return web.Response(text=render(self.kind, self.s.model_name, self.engine),
                            content_type="text/plain", charset="utf-8")

    async def h_flush(self, request):
        self.engine.reset_prefix_cache()
        return _json({"success": True}) if self.kind == "vllm" else web.Response(text="Cache flushed.\n")

    async def h_stats(self, request):
        try:
            n = int(request.query.get("requests", "0"))
        except ValueError:
            return error_response("requests must be an integer")
        await self.s.settle()
        return _json({"instance": self.stats(n),
                      "cluster": [i.stats(n) for i in self.s.instances]})

    async def h_stats_reset(self, request):
        for inst in self.s.instances:
            e = inst.engine
            e.max_waiting_seen = e.num_waiting
            e.max_running_seen = len(e.running)
        return _json({"ok": True})

    async def h_cache(self, request):
        pool = self.engine.pool
        return _json({"block_size": pool.block_size,
                      "hashes": sorted(pool.cached),
                      "num_blocks": pool.num_blocks})

    async def h_fault(self, request):
        try:
            body = json.loads(await request.read() or b"{}")
            if not isinstance(body, dict):
                raise FaultError("body must be a JSON object")
            fault = Fault.from_dict(body)
        except (ValueError, TypeError) as exc:
            return error_response(f"bad fault: {exc}")
        target = body.get("instance", self.name)
        if target == "all":
            targets = list(self.s.instances)
        else:
            inst = self._find(target)
            if inst is None:
                return error_response(f"unknown instance {target!r}", status=404)
            targets = [inst]
        for inst in targets:
            await inst.set_fault(fault)
        return _json({"instances": [i.name for i in targets], "fault": fault.as_dict()})

    async def set_fault(self, fault):
        was_dead = self.dead
        self.fault = fault
        self.engine.slow_factor = fault.factor if fault.mode == "slow" else 1.0
        if self.publisher is not None:
            self.publisher.drop_rate = (fault.rate if fault.mode == "kv_drop"
                                        else self.s.kv_drop_rate)
        if fault.mode == "exit" and not was_dead:
            # answer the POST first, then die
            asyncio.get_running_loop().call_later(0.01, lambda: asyncio.ensure_future(self.crash()))
        elif fault.mode != "exit" and was_dead:
            await self.revive()

    # -- sequential P/D: the prefill side of a pull --------------------------
    async def h_kv_pull(self, request):
        try:
            body = json.loads(await request.read())
            rid = body["remote_request_id"]
        except (ValueError, KeyError, TypeError):
            return error_response("bad kv pull request")
        if body.get("remote_engine_id") != self.engine_id:
            return error_response(
                f"unknown remote_engine_id {body.get('remote_engine_id')!r} at "
                f"{self.host}:{self.port} (this engine is {self.engine_id!r}): "
                "stale or forged kv_transfer_params", status=404, etype="not_found")
        entry = self.transfers.get(rid)
        if entry is None:
            return error_response(
                f"no KV held for remote_request_id {rid!r}: unknown, already "
                "pulled, or freed after the transfer timeout", status=404,
                etype="not_found")
        seq, handle = entry
        if body.get("remote_block_ids") != seq.blocks:
            return error_response("remote_block_ids do not match the blocks held for "
                                  f"{rid!r}", status=409, etype="conflict")
        if body.get("prompt_tokens") != seq.prompt_len or body.get("prompt_digest") != seq.seed:
            return error_response(f"the decode request's prompt differs from the prompt "
                                  f"prefilled for {rid!r}", status=409, etype="conflict")
        del self.transfers[rid]
        handle.cancel()
        p = self.s.preset
        dur = (p.kv_transfer_base + p.kv_transfer_per_token * seq.prompt_len) / self.s.speedup
        try:
            await asyncio.sleep(dur)
        finally:
            self.engine.release_held(seq)
        self.kv_pulls_served += 1
        return _json({"ok": True, "num_tokens": seq.prompt_len, "transfer_s": dur})

    def _hold_for_transfer(self, seq):
        self._counter += 1
        key = f"{seq.rid}@{self._counter}"
        handle = asyncio.get_running_loop().call_later(
            self.s.kv_transfer_timeout, self._expire_transfer, key)
        self.transfers[key] = (seq, handle)
        return {"do_remote_prefill": True, "do_remote_decode": False,
                "remote_block_ids": list(seq.blocks), "remote_engine_id": self.engine_id,
                "remote_request_id": key, "remote_host": self.host,
                "remote_port": self.port, "tp_size": 1}

    def _expire_transfer(self, key):
        entry = self.transfers.pop(key, None)
        if entry is not None:
            self.kv_transfers_expired += 1
            self.engine.release_held(entry[0])

    def _pull_loader(self, ktp):
        host, port = ktp["remote_host"], ktp["remote_port"]
        payload = {k: ktp.get(k) for k in ("remote_request_id", "remote_engine_id",
                                            "remote_block_ids")}
        timeout = self.s.kv_transfer_timeout

        async def loader(seq):
            body = dict(payload, prompt_tokens=seq.prompt_len, prompt_digest=seq.seed,
                        decode=self.name)
            url = f"http://{host}:{port}/sim/kv/pull"
            try:
                async with self.s.client().post(
                        url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                    raw = await r.read()
                    if r.status == 200:
                        return None
                    try:
                        msg = json.loads(raw)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        msg = f"HTTP {r.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                msg = f"{exc.__class__.__name__}: {exc}"
            raise pd.TransferError(f"KV transfer from {host}:{port} failed: {msg}")
        return loader

    # -- parsing ---------------------------------------------------------------
    def _tokenize_prompt(self, prompt, api):
        tok = self.s.tokenizer
        if isinstance(prompt, str):
            return [tok.encode(prompt)], True
        if isinstance(prompt, list) and prompt:
            if all(type(t) is int for t in prompt):
                return [prompt], False
            if all(isinstance(p, str) for p in prompt):
                return [tok.encode(p) for p in prompt], True
            if all(isinstance(p, list) and p and all(type(t) is int for t in p)
                   for p in prompt):
                return list(prompt), False
        raise SimError("'prompt' must be a string, a list of strings, a list of token "
                       "ids or a list of lists of token ids")

    def _parse(self, body, api):
        tok = self.s.tokenizer
        p = self.s.preset
        r = Parsed()
        r.api = api
        r.render = None
        r.stream = bool(body.get("stream", False))
        so = body.get("stream_options")
        r.include_usage = bool(r.stream and isinstance(so, dict) and so.get("include_usage"))
        if body.get("n", 1) not in (1, None):
            raise SimError("the simulator supports n=1 only")
        if api == "chat":
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise SimError("'messages' must be a non-empty list of objects")
            given = self._given_chat_ids(body)
            if given is None:
                r.prompts, r.text_prompts = [self._render(body, msgs)], True
            else:
                # the parity check renders it later, off the request's path
                r.prompts, r.text_prompts, r.render = [given], False, (body, msgs)
            mt = body.get("max_completion_tokens")
            r.max_tokens = _int_field(body, "max_completion_tokens" if mt is not None else "max_tokens", None, 1)
            r.min_tokens = _int_field(body, "min_tokens", 0)
            r.ignore_eos = bool(body.get("ignore_eos", False))
        elif api == "generate":
            if body.get("input_ids") is not None:
                r.prompts, r.text_prompts = self._tokenize_prompt(body["input_ids"], api)
            elif body.get("text") is not None:
                r.prompts, r.text_prompts = self._tokenize_prompt(body["text"], api)
            else:
                raise SimError("'text' or 'input_ids' is required")
            sp = body.get("sampling_params") or {}
            if not isinstance(sp, dict):
                raise SimError("'sampling_params' must be an object")
            r.max_tokens = _int_field(sp, "max_new_tokens", 128, 0)
            r.min_tokens = _int_field(sp, "min_new_tokens", 0)
            r.ignore_eos = bool(sp.get("ignore_eos", False))
        else:
            if "prompt" not in body:
                raise SimError("'prompt' is required")
            r.prompts, r.text_prompts = self._tokenize_prompt(body["prompt"], api)
            r.max_tokens = _int_field(body, "max_tokens", None, 1)
            r.min_tokens = _int_field(body, "min_tokens", 0)
            r.ignore_eos = bool(body.get("ignore_eos", False))
        r.eos_at = _int_field(body, "sim_eos_at", None, 1)
        vocab = tok.vocab_size
        for ids in r.prompts:
            if not ids:
                raise SimError("the prompt is empty")
            if not r.text_prompts and (min(ids) < 0 or max(ids) >= vocab):
                raise SimError(f"token id out of vocabulary (0..{vocab - 1})")
            if len(ids) >= p.max_model_len:
                raise SimError(f"This model's maximum context length is {p.max_model_len} "
                               f"tokens. However, your request has {len(ids)} input tokens.")
            if -(-(len(ids) + 1) // p.block_size) > p.num_blocks:
                raise SimError(f"the prompt needs more KV blocks than this instance has "
                               f"({p.num_blocks} blocks of {p.block_size} tokens)")
        if r.max_tokens == 0:
            raise SimError("max_tokens must be at least 1")
        # P/D parameters
        r.mode = None
        r.ktp = None
        if self.kind == "vllm":
            ktp = body.get("kv_transfer_params")
            if ktp is not None and not isinstance(ktp, dict):
                raise SimError("'kv_transfer_params' must be an object")
            if ktp and ktp.get("do_remote_decode"):
                r.mode = "kv_producer"
            elif ktp and ktp.get("do_remote_prefill"):
                r.mode = "kv_consumer"
                for key, typ in (("remote_host", str), ("remote_port", int),
                                 ("remote_engine_id", str), ("remote_request_id", str),
                                 ("remote_block_ids", list)):
                    v = ktp.get(key)
                    if not isinstance(v, typ) or isinstance(v, bool):
                        raise SimError(f"invalid kv_transfer_params: '{key}' is missing "
                                       f"or not a {typ.__name__}")
            r.ktp = ktp
            if r.mode and len(r.prompts) > 1:
                raise SimError("kv_transfer_params cannot be used with a batch of prompts")
        else:
            room = body.get("bootstrap_room")
            if room is None:
                if self.role in ("prefill", "decode"):
                    raise SimError(f"this SGLang {self.role} instance needs bootstrap_host, "
                                   "bootstrap_port and bootstrap_room")
            elif self.role in ("prefill", "decode"):
                n = len(r.prompts)
                rooms = room if isinstance(room, list) else [room]
                hosts = body.get("bootstrap_host")
                ports = body.get("bootstrap_port")
                hosts = hosts if isinstance(hosts, list) else [hosts] * n
                ports = ports if isinstance(ports, list) else [ports] * n
                if not (len(rooms) == len(hosts) == len(ports) == n):
                    raise SimError("bootstrap_room/host/port lists must match the batch size")
                for x in rooms:
                    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 2 ** 64:
                        raise SimError(f"invalid bootstrap_room {x!r}")
                if self.role == "decode":
                    for h, pt in zip(hosts, ports):
                        if not isinstance(h, str) or isinstance(pt, bool) or not isinstance(pt, int):
                            raise SimError("bootstrap_host must be a string and "
                                           "bootstrap_port an integer")
                r.rooms, r.boot_hosts, r.boot_ports = rooms, hosts, ports
                r.mode = "boot_prefill" if self.role == "prefill" else "boot_decode"
        return r

    def _tokenizes(self, body, api):
        """Whether parsing this body runs the tokenizer (then it is parsed
        in the front end's thread)."""
        if api == "chat":
            try:
                return self._given_chat_ids(body) is None
            except SimError:
                return False
        return has_text(body.get("prompt") if api == "completion" else (
            body.get("text") if body.get("input_ids") is None else None))

    def _given_chat_ids(self, body):
        """The token ids a chat request carries in the form this engine reads
        (SGLang: `input_ids` beside `messages`; vLLM: a decode leg's
        `kv_transfer_params.prompt_token_ids`), else None."""
        if self.kind == "sglang":
            v = body.get("input_ids")
            return None if v is None else _id_list(v, "input_ids")
        ktp = body.get("kv_transfer_params")
        if isinstance(ktp, dict) and ktp.get("do_remote_prefill") \
                and ktp.get("prompt_token_ids") is not None:
            return _id_list(ktp["prompt_token_ids"], "kv_transfer_params.prompt_token_ids")
        return None

    def _render(self, body, msgs):
        try:
            kwargs, _ = template_kwargs(body)
        except ValueError as exc:
            raise SimError(str(exc)) from None
        try:
            return self.s.tokenizer.render_chat(
                msgs, tools=body.get("tools"),
                add_generation_prompt=kwargs["add_generation_prompt"], kwargs=kwargs,
                continue_final_message=kwargs["continue_final_message"],
                add_special_tokens=bool(body.get("add_special_tokens", False)))
        except ChatTemplateError as exc:
            raise SimError(str(exc)) from None
        except Exception as exc:   # a template that fails to render
            raise SimError(f"chat template failed: {exc}") from None

    def _check_parity(self, r):
        """Count forwarded id lists that differ from our own tokenization
        (the rendered chat; for a completions id prompt, the ids' own
        round trip through the tokenizer).  The check runs in the front
        end's thread after the request has gone on; /sim/stats and
        /metrics wait for the checks in flight."""
        if not self.s.check_token_ids or r.text_prompts or (
                r.render is None and not self.s.tokenizer.round_trips):
            return
        job = asyncio.ensure_future(self.s.in_front_end(self._parity, r))
        e = self.engine     # the engine that took the request (revive replaces it)

        def count(fut):
            self.s.parity_jobs.discard(fut)
            if fut.cancelled() or fut.exception() is not None:
                # not counted: say why, or a missing check has no trace
                log(f"{self.name}: the token parity check did not run: "
                    f"{'cancelled' if fut.cancelled() else repr(fut.exception())}")
                return
            for ok in fut.result():
                e.token_parity_checked += 1
                if not ok:
                    e.token_parity_mismatches += 1
        self.s.parity_jobs.add(job)
        job.add_done_callback(count)

    def _parity(self, r):
        """[True/False per checkable prompt] (the front end's thread)."""
        if r.render is not None:
            body, msgs = r.render
            try:
                own = self._render(body, msgs)
            except SimError:
                own = None      # the engine would not render: the ids are used
            return [given == own for given in r.prompts]
        tok = self.s.tokenizer
        return [ok for ok in (tok.canonical(ids) for ids in r.prompts) if ok is not None]

    def _tokenize_cost(self, tokens):
        """Seconds the front end takes to tokenize that many prompt tokens."""
        return self.s.preset.tokenize_per_token * tokens / self.s.speedup

    async def _tokenize_delay(self, r, arrived):
        """The engine front end tokenizes text prompts one request at a time:
        wait our turn on the lane and the cost of our tokens, counted from
        the request's arrival (the real tokenizing the simulator did since
        is part of that cost, not added to it).  Prompts sent as ids skip
        it (that is what the proxy's reuse buys)."""
        e = self.engine
        n = sum(len(ids) for ids in r.prompts)
        if not r.text_prompts:
            e.tokenize_skipped_tokens += n
            return
        e.tokenized_tokens += n
        cost = self._tokenize_cost(n)
        if cost <= 0:
            return
        now = time.monotonic()
        start = max(arrived, self.tokenize_free_at)
        self.tokenize_free_at = start + cost
        e.tokenize_time += cost
        await asyncio.sleep(self.tokenize_free_at - now)

    # -- inference -------------------------------------------------------------
    async def h_completions(self, request):
        return await self._serve(request, "completion")

    async def h_chat(self, request):
        return await self._serve(request, "chat")

    async def h_generate(self, request):
        return await self._serve(request, "generate")

    def _drop_connection(self, request):
        # close(), not abort(): what was already written still reaches the
        # client, then the connection ends without completing the response
        tr = request.transport
        if tr is not None:
            tr.close()
        raise SimulatedDrop("simulated fault: drop")

    async def _serve(self, request, api):
        xrid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        f = self.fault
        if f.mode == "hang":
            await asyncio.Future()
        if f.mode == "drop" and f.after_tokens == 0:
            self.engine.errors_total += 1
            self._drop_connection(request)
        if f.mode == "error" and self.rng.random() < f.rate:
            self.engine.errors_total += 1
            return error_response("simulated fault: error", status=f.status,
                                  etype="server_error", xrid=xrid)
        arrived = time.monotonic()
        try:
            try:
                body = json.loads(await request.read())
            except ValueError as exc:
                raise SimError(f"invalid JSON body: {exc}") from None
            if not isinstance(body, dict):
                raise SimError("the body must be a JSON object")
            if self._tokenizes(body, api):
                r = await self.s.in_front_end(self._parse, body, api)
            else:
                r = self._parse(body, api)
        except SimError as exc:
            self.engine.errors_total += 1
            return error_response(exc.message, exc.status, exc.etype, xrid)
        self._check_parity(r)
        await self._tokenize_delay(r, arrived)
        p = self.s.preset
        prefix = "chatcmpl" if api == "chat" else "cmpl"
        waiter = _Waiter(only_finish=not r.stream)
        seqs = []
        for i, ids in enumerate(r.prompts):
            mt = r.max_tokens
            if mt is None:
                mt = self.s.default_max_tokens
            mt = min(mt, p.max_model_len - len(ids))
            if r.mode in ("kv_producer", "boot_prefill"):
                mt = 1
            seq = Seq(f"{prefix}-{xrid}-{i}", ids, mt,
                      min_tokens=0 if r.mode in ("kv_producer", "boot_prefill") else r.min_tokens,
                      ignore_eos=r.ignore_eos, eos_at=r.eos_at,
                      force_eos_first=(f.mode == "eos_first"), xrid=xrid,
                      kind=r.mode or "local")
            seq.listener = waiter
            if r.text_prompts:      # what _tokenize_delay charged for this prompt
                seq.tokenize_s = self._tokenize_cost(len(ids))
            if r.mode == "kv_producer":
                seq.hold_blocks = True
            elif r.mode == "kv_consumer":
                seq.loader = self._pull_loader(r.ktp)
            elif r.mode == "boot_prefill":
                seq.hold_blocks = True
                seq.kind = "bootstrap"
            elif r.mode == "boot_decode":
                seq.loader = pd.bootstrap_loader(self, r.boot_hosts[i], r.boot_ports[i], r.rooms[i])
            seqs.append(seq)
        rooms = []
        resp = None
        try:
            if r.stream:
                resp = web.StreamResponse(status=200, headers={
                    "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                    "X-Request-Id": xrid})
                await resp.prepare(request)
                if api == "chat":
                    await resp.write(self._chat_role_chunk(seqs))
            if r.mode == "boot_prefill":
                rooms = [self.boot.room_for(seq, room) for seq, room in zip(seqs, r.rooms)]
                await asyncio.gather(*(self.boot.pair(rm) for rm in rooms))
            for seq in seqs:
                if not seq.finished:
                    self.engine.add(seq)
            if r.stream:
                return await self._stream(request, resp, r, seqs, waiter, rooms)
            while not all(s.finished for s in seqs):
                await waiter.wait()
            if rooms:
                await asyncio.gather(*(self.boot.send_kv(rm) for rm in rooms))
            bad = [s for s in seqs if s.error]
            if bad:
                return error_response(bad[0].error, status=bad[0].info.get("status", 500),
                                      etype="server_error", xrid=xrid)
            if self.fault.mode == "stall":
                await asyncio.Future()
            if self.fault.mode == "drop":
                self.engine.errors_total += 1
                self._drop_connection(request)
            data = self._final_body(r, seqs)
            if r.mode == "kv_producer":
                s0 = seqs[0]
                data["kv_transfer_params"] = (self._hold_for_transfer(s0)
                                              if s0.finish_reason == "length" else None)
            return _json(data, headers={"X-Request-Id": xrid})
        except ConnectionResetError as exc:
            if resp is None or isinstance(exc, SimulatedDrop):
                raise
            return resp     # the client went away mid-stream: abort quietly (below)
        finally:
            for seq in seqs:
                if not seq.finished:
                    self.engine.abort(seq)
            for rm in rooms:
                self.boot.release(rm)

    # -- response bodies -------------------------------------------------------
    def _text(self, ids):
        tok = self.s.tokenizer
        eos = tok.eos_id
        return "".join(tok.piece(t) for t in ids if t != eos)

    def _usage(self, seqs):
        pt = sum(s.prompt_len for s in seqs)
        ct = sum(len(s.output) for s in seqs)
        return {"prompt_tokens": pt, "total_tokens": pt + ct, "completion_tokens": ct,
                "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in seqs)}}

    def _meta(self, s):
        fr = s.finish_reason
        if fr == "length":
            fin = {"type": "length", "length": len(s.output)}
        elif fr == "stop":
            fin = {"type": "stop", "matched": self.s.tokenizer.eos_id}
        else:
            fin = None
        e2e = (s.finish_time - s.arrival) if s.finish_time and s.arrival else None
        return {"id": s.rid, "finish_reason": fin, "prompt_tokens": s.prompt_len,
                "completion_tokens": len(s.output), "cached_tokens": s.cached_tokens,
                "e2e_latency": e2e}

    def _final_body(self, r, seqs):
        now = int(time.time())
        model = self.s.model_name
        if r.api == "generate":
            outs = [{"text": self._text(s.output), "output_ids": list(s.output),
                     "meta_info": self._meta(s)} for s in seqs]
            return outs[0] if len(outs) == 1 else outs
        if r.api == "chat":
            s = seqs[0]
            data = {"id": s.rid.rsplit("-", 1)[0], "object": "chat.completion",
                    "created": now, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant",
                                                         "content": self._text(s.output)},
                                 "logprobs": None, "finish_reason": s.finish_reason,
                                 "stop_reason": None}],
                    "usage": self._usage(seqs)}
        else:
            data = {"id": seqs[0].rid.rsplit("-", 1)[0], "object": "text_completion",
                    "created": now, "model": model,
                    "choices": [{"index": i, "text": self._text(s.output), "logprobs": None,
                                 "finish_reason": s.finish_reason, "stop_reason": None,
                                 "prompt_logprobs": None} for i, s in enumerate(seqs)],
                    "usage": self._usage(seqs)}
        if self.kind == "vllm":
            data["kv_transfer_params"] = None
        return data

    def _chat_role_chunk(self, seqs):
        s = seqs[0]
        return ("data: " + json.dumps({
            "id": s.rid.rsplit("-", 1)[0], "object": "chat.completion.chunk",
            "created": int(time.time()), "model": self.s.model_name,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}]}) + "\n\n").encode()

    def _chunk(self, r, i, s, new_ids, finished):
        fr = s.finish_reason if finished else None
        if r.api == "generate":
            d = {"text": self._text(s.output), "output_ids": list(s.output),
                 "meta_info": self._meta(s) if finished else {
                     "id": s.rid, "finish_reason": None, "prompt_tokens": s.prompt_len,
                     "completion_tokens": len(s.output), "cached_tokens": s.cached_tokens}}
            if len(r.prompts) > 1:
                d["index"] = i
            return d
        base = s.rid.rsplit("-", 1)[0]
        if r.api == "chat":
            return {"id": base, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": self.s.model_name,
                    "choices": [{"index": i, "delta": {"content": self._text(new_ids)},
                                 "logprobs": None, "finish_reason": fr, "stop_reason": None}]}
        return {"id": base, "object": "text_completion", "created": int(time.time()),
                "model": self.s.model_name,
                "choices": [{"index": i, "text": self._text(new_ids), "logprobs": None,
                             "finish_reason": fr, "stop_reason": None}]}

    async def _stream(self, request, resp, r, seqs, waiter, rooms):
        n = len(seqs)
        sent = [0] * n
        done = [False] * n
        total = 0
        while True:
            parts = []
            for i, s in enumerate(seqs):
                if done[i]:
                    continue
                if s.error:
                    parts.append("data: " + json.dumps(error_body(
                        s.error, "server_error", s.info.get("status", 500))) + "\n\n")
                    await resp.write("".join(parts).encode())
                    await resp.write_eof()
                    return resp
                k = len(s.output)
                fin = s.finished
                if k > sent[i] or fin:
                    f = self.fault
                    if f.mode in ("stall", "drop") and total + (k - sent[i]) >= f.after_tokens:
                        k = sent[i] + max(0, f.after_tokens - total)
                        if k > sent[i]:
                            parts.append("data: " + json.dumps(
                                self._chunk(r, i, s, s.output[sent[i]:k], False)) + "\n\n")
                            await resp.write("".join(parts).encode())
                        if f.mode == "stall":
                            await asyncio.Future()
                        self._drop_connection(request)
                    parts.append("data: " + json.dumps(
                        self._chunk(r, i, s, s.output[sent[i]:k], fin)) + "\n\n")
                    total += k - sent[i]
                    sent[i] = k
                    done[i] = fin
            if all(done):
                if rooms:
                    await asyncio.gather(*(self.boot.send_kv(rm) for rm in rooms))
                if r.include_usage and r.api != "generate":
                    s0 = seqs[0]
                    obj = "chat.completion.chunk" if r.api == "chat" else "text_completion"
                    parts.append("data: " + json.dumps({
                        "id": s0.rid.rsplit("-", 1)[0], "object": obj,
                        "created": int(time.time()), "model": self.s.model_name,
                        "choices": [], "usage": self._usage(seqs)}) + "\n\n")
                parts.append("data: [DONE]\n\n")
                await resp.write("".join(parts).encode())
                await resp.write_eof()
                return resp
            if parts:
                await resp.write("".join(parts).encode())
            await waiter.wait()


def log(msg):
    print(f"omni-ctl sim: {msg}", file=sys.stderr, flush=True)
