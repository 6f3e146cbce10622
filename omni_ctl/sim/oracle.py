"""The oracle router (`omni-ctl sim --oracle-port P`): a yardstick, not a product.

A router that runs in the simulator's process and listens on its own loopback
port. It speaks the client API and routes like a P/D router: sequential
(vLLM: prefill leg with `kv_transfer_params`, then the decode leg) for
`--engine vllm`, parallel (SGLang: both legs at once with a bootstrap room) for
`--engine sglang`, one plain leg when the cluster has a single tier. Every leg
goes over real loopback HTTP (one aiohttp session, keepalive), so its timings
compare with other routers'. What makes it an oracle is how it chooses:

- it reads every engine's exact state in-process, at the moment it decides:
  the prefix cache (after evictions and flushes), the waiting and running
  requests with their progress, the end of the step in flight, the `slow`
  fault factor, and the cost model of the preset;
- prefill: the instance with the least predicted TTFT = the rest of the step in
  flight + the prefill work queued ahead of the request + its own uncached
  prefill, all in the preset's cost model. Prefix tokens the instance will hold
  once the work already sent to it is computed count as held. Instances within
  `slack` of the best are equivalent; among them the longest hit wins;
- decode: the instance with the fewest tokens running, waiting and on the way.

Work it has sent that has not reached an engine yet ("in transit", matched by
X-Request-Id) counts as queued there, so a burst does not all land on one
instance. docs/simulator.md ("The oracle router") is the reference.
"""

import asyncio
import json
import math
import random
import time
import uuid
from array import array
from collections import deque

import aiohttp
from aiohttp import web

from .kvcache import prompt_block_hashes
from .server import has_text

PREFILL_KTP = {"do_remote_decode": True, "do_remote_prefill": False,
               "remote_engine_id": None, "remote_block_ids": None,
               "remote_host": None, "remote_port": None}


def _error(message, status, etype="server_error", xrid=None):
    headers = {"X-Request-Id": xrid} if xrid else None
    return web.Response(status=status, headers=headers, content_type="application/json",
                        text=json.dumps({"error": {"message": message, "type": etype,
                                                   "code": status}}))


def _error_event(message, status=502):
    return ("data: " + json.dumps({"error": {"message": message, "type": "server_error",
                                             "code": status}}) + "\n\n").encode()


def _common_blocks(a, b, limit):
    """Length of the common prefix of two chained block-hash lists. A chained
    hash that matches implies every earlier block matches, so bisect."""
    n = min(len(a), len(b), limit)
    if n == 0 or a[0] != b[0]:
        return 0
    if a[n - 1] == b[n - 1]:
        return n
    lo, hi = 1, n - 1          # a[lo-1] == b[lo-1], a[hi] != b[hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] == b[mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo


class _Transit:
    """A leg the oracle sent that its engine has not queued yet."""

    __slots__ = ("tokens", "pairs", "hashes", "prompt_len")

    def __init__(self, tokens, pairs, hashes, prompt_len):
        self.tokens = tokens          # prefill tokens it will compute
        self.pairs = pairs            # their attention query-key pairs
        self.hashes = hashes          # block hashes it will leave cached
        self.prompt_len = prompt_len


class _Queue:
    """One engine's queued work: prefill tokens still to compute and their
    attention pairs, running decodes and the KV they read, seats taken, output
    tokens each running request still owes (sorted), block-hash lists of the
    queued prompts by first block, and all tokens held (the decode load)."""

    __slots__ = ("key", "tokens", "pairs", "decodes", "kv", "seats", "rest", "firsts", "load")

    def __init__(self, key):
        self.key = key
        self.tokens = self.decodes = self.kv = self.seats = self.load = 0
        self.pairs = 0.0
        self.rest = []
        self.firsts = {}


class _LegError(Exception):
    """A leg that got no HTTP answer (connection refused, reset, ...)."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class Oracle:
    def __init__(self, settings, instances, engine_kind, port, host="127.0.0.1",
                 slack=0.1, recent=200):
        self.s = settings
        self.kind = engine_kind
        self.host = host
        self.port = port
        self.slack = slack
        pre = [i for i in instances if i.role == "prefill"]
        dec = [i for i in instances if i.role != "prefill"]
        if pre and dec:
            self.mode = "sequential" if engine_kind == "vllm" else "parallel"
            self.prefill_tier, self.decode_tier = pre, dec
        else:
            self.mode = "plain"
            self.prefill_tier, self.decode_tier = pre or dec, []
        self.transit = {i.name: {} for i in instances}
        self._queues = {}
        self.session = None
        self._runner = None
        self._bg = set()
        self._rr = {"prefill": 0, "decode": 0}
        self.recent = deque(maxlen=recent)
        self.counts = {"requests": 0, "errors": 0, "prefill": {}, "decode": {},
                       "decisions": {"cache": 0, "load": 0, "none": 0},
                       "prompt_tokens": 0, "expected_hit_tokens": 0}

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------
    async def start(self):
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        app = web.Application(client_max_size=256 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/completions", self.h_completions)
        r.add_post("/v1/chat/completions", self.h_chat)
        r.add_get("/v1/models", self.h_models)
        r.add_get("/health", self.h_health)
        r.add_get("/oracle/stats", self.h_stats)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port, backlog=4096,
                              reuse_address=True).start()
        except OSError:
            await self.stop()
            raise

    async def stop(self):
        for t in list(self._bg):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    # -- what the engines will see -------------------------------------------------
    def _prompts(self, body, api):
        """Token ids of each prompt as the engines will tokenize them, or None
        when the body is malformed (the engine then answers the error)."""
        tok = self.s.tokenizer
        try:
            if api == "chat":
                msgs = body.get("messages")
                if not isinstance(msgs, list) or not msgs:
                    return None
                gen = body.get("add_generation_prompt", True)
                return [tok.render_chat(msgs, tools=body.get("tools"), add_generation_prompt=gen,
                                        kwargs=body.get("chat_template_kwargs") or {})]
            p = body.get("prompt")
            if isinstance(p, str):
                return [tok.encode(p)]
            if isinstance(p, list) and p:
                if isinstance(p[0], int):
                    array("I", p)       # every id an int in range (fast, in C), or raise
                    return [p]
                if all(isinstance(x, str) for x in p):
                    return [tok.encode(x) for x in p]
                if all(isinstance(x, list) and x for x in p):
                    for x in p:
                        array("I", x)
                    return p
        except Exception:      # not a prompt the engine takes: the engine reports it
            return None
        return None

    # -- prediction ------------------------------------------------------------------
    def _queue(self, inst):
        """The engine's queued work, summarised. Rebuilt only when the engine's
        state moved (a step, an arrival, a finish...), so a burst of decisions
        within one step reads the engine once. Engine requests that carry the
        X-Request-Id of a leg in transit have arrived: that leg leaves the list."""
        e = inst.engine
        key = (id(e), e.steps_total, e.requests_total, e.requests_finished, e.errors_total,
               e.aborted_total, len(e.waiting), len(e.running), len(e.loading))
        q = self._queues.get(inst.name)
        if q is not None and q.key == key:
            return q
        q = _Queue(key)
        transit = self.transit[inst.name]
        bs, pool = e.bs, e.pool
        firsts = q.firsts
        for s in e.running:
            if transit:
                transit.pop(s.xrid, None)
            q.load += s.num_tokens
            q.rest.append(max(s.max_tokens - len(s.output), 1))
            if s.num_computed >= s.prompt_len:
                q.decodes += 1
                q.kv += s.num_computed
                continue
            n = s.num_tokens - s.num_computed
            q.tokens += n
            q.pairs += n * (s.num_computed + n / 2.0)
            if s.hashes:
                firsts.setdefault(s.hashes[0], []).append(s.hashes)
        for s in e.waiting:
            if transit:
                transit.pop(s.xrid, None)
            q.load += s.num_tokens
            if s.blocks:
                comp = s.num_computed
            elif s.loader is not None:
                comp = s.prompt_len - 1     # its KV comes from a prefill instance
            else:
                # the hit it will get when admitted (computed once per request)
                comp = s.info.get("oracle_hit")
                if comp is None:
                    comp = len(pool.match_prefix(s.hashes[:(s.num_tokens - 1) // bs])) * bs
                    s.info["oracle_hit"] = comp
            n = s.num_tokens - comp
            q.tokens += n
            q.pairs += n * (comp + n / 2.0)
            if s.hashes:
                firsts.setdefault(s.hashes[0], []).append(s.hashes)
        for s in e.loading:
            if transit:
                transit.pop(s.xrid, None)
            q.load += s.num_tokens
        q.seats = len(e.running) + len(e.waiting) + len(e.loading)
        q.rest.sort()
        self._queues[inst.name] = q
        return q

    def _prefill_estimate(self, inst, hashes, nblk, length, now):
        """(predicted TTFT in seconds, prefix tokens the instance holds or will
        hold) for a prompt of `length` tokens whose first `nblk` full blocks
        hash to `hashes`. Reads the engine's state; changes nothing there but a
        memo in waiting requests' `info`."""
        e = inst.engine
        p, bs = e.p, e.bs
        q = self._queue(inst)
        transit = self.transit[inst.name]
        held = len(e.pool.match_prefix(hashes)) if nblk else 0
        if nblk and held < nblk:
            # blocks that queued or in-transit work will have cached by then;
            # chained hashes: a list that matches block `held` matches all before
            others = list(q.firsts.get(hashes[0], ()))
            others.extend(t.hashes for t in transit.values())
            for other in others:
                if len(other) > held and other[held] == hashes[held]:
                    held = _common_blocks(hashes, other, nblk)
                    if held == nblk:
                        break
        q_tok = q.tokens + sum(t.tokens for t in transit.values())
        q_pairs = q.pairs + sum(t.pairs for t in transit.values())
        scale = e.slow_factor / e.speedup
        in_flight = max(e.busy_until - now, 0.0)
        if in_flight > 0 and e.last_step and q_tok:
            # the step in flight already computes part of the queue
            done = min(e.last_step["prefill_tokens"], q_tok)
            q_pairs *= 1.0 - done / q_tok
            q_tok -= done
        ctx = held * bs
        n = length - ctx
        total = q_tok + n
        pairs = q_pairs + n * (ctx + n / 2.0)
        per_step = p.a + p.e * q.decodes + p.f * q.kv
        budget = max(p.max_num_batched_tokens - q.decodes, 1)
        steps = math.ceil(total / budget)
        t = in_flight + (steps * per_step + p.b * total + p.c * pairs) * scale
        over = q.seats + len(transit) + 1 - p.max_num_seqs
        if over > 0 and q.rest:
            # no free seat: wait until enough running requests have finished
            t += q.rest[min(over, len(q.rest)) - 1] * per_step * scale
        return t, ctx

    def _decode_load(self, inst):
        """Tokens running, waiting and in transit on an instance."""
        return self._queue(inst).load + sum(t.prompt_len for t in self.transit[inst.name].values())

    def _rotation(self, which):
        """The live instances of a tier, starting one further each call, so
        that ties (identical idle instances) take turns."""
        tier = self.prefill_tier if which == "prefill" else self.decode_tier
        if not tier:
            return []
        self._rr[which] += 1
        k = self._rr[which] % len(tier)
        return [i for i in tier[k:] + tier[:k] if not i.dead]

    def choose_prefill(self, prompts, xrid):
        """Pick the prefill (or plain) instance; record the leg as in transit."""
        cands = self._rotation("prefill")
        if not cands:
            return None, None
        now = asyncio.get_running_loop().time()
        bs = cands[0].engine.bs
        first = prompts[0] if prompts else []
        length = sum(len(x) for x in prompts) if prompts else 1
        nblk = max(len(first) - 1, 0) // bs
        hashes = prompt_block_hashes(first[:nblk * bs], bs, self.s.salt) if nblk else []
        est = [(inst,) + self._prefill_estimate(inst, hashes, nblk, max(length, 1), now)
               for inst in cands]
        best = min(t for _, t, _ in est)
        a = cands[0].engine.p.a / self.s.speedup
        limit = best * (1.0 + self.slack) + a
        # within the slack the longest hit wins, then the lowest TTFT; ties
        # keep the rotation order (spreads identical instances)
        inst, ttft, hit = min((x for x in est if x[1] <= limit), key=lambda x: (-x[2], x[1]))
        top = max(h for _, _, h in est)
        reason = "none" if top == 0 else ("cache" if hit == top else "load")
        n = max(length - hit, 1)
        self.transit[inst.name][xrid] = _Transit(n, n * (hit + n / 2.0), hashes, length)
        c = self.counts
        c["decisions"][reason] += 1
        c["prefill"][inst.name] = c["prefill"].get(inst.name, 0) + 1
        c["prompt_tokens"] += length
        c["expected_hit_tokens"] += hit
        rec = {"x_request_id": xrid, "mode": self.mode, "prefill": inst.name,
               "decode": None, "prompt_tokens": length, "hit_tokens": hit,
               "reason": reason, "predicted_ttft_s": round(ttft, 6),
               "candidates": {i.name: {"ttft_s": round(t, 6), "hit_tokens": h}
                              for i, t, h in est}}
        self.recent.append(rec)
        return inst, rec

    def choose_decode(self, prompt_len, xrid, rec=None):
        cands = self._rotation("decode")
        if not cands:
            return None
        loads = [(inst, self._decode_load(inst)) for inst in cands]
        inst, _ = min(loads, key=lambda x: x[1])
        self.transit[inst.name][xrid] = _Transit(0, 0.0, [], prompt_len)
        c = self.counts
        c["decode"][inst.name] = c["decode"].get(inst.name, 0) + 1
        if rec is not None:
            rec["decode"] = inst.name
            rec["decode_loads"] = {i.name: n for i, n in loads}
        return inst

    def _arrived(self, inst, xrid):
        self.transit[inst.name].pop(xrid, None)

    # -- legs --------------------------------------------------------------------------
    async def _call(self, inst, path, body, xrid):
        """POST a leg and read its whole answer: (status, raw, content type)."""
        try:
            async with self.session.post(
                    inst.url + path, data=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json", "X-Request-Id": xrid}) as r:
                return r.status, await r.read(), r.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientError, OSError) as exc:
            raise _LegError(f"{inst.name} ({inst.host}:{inst.port}) failed: "
                            f"{exc.__class__.__name__}: {exc}") from None
        finally:
            self._arrived(inst, xrid)

    async def _pipe(self, request, inst, path, body, xrid, state=None):
        """POST a leg (a dict, or bytes sent as they are) and relay its answer to
        the client, chunk by chunk for SSE."""
        resp = None
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            async with self.session.post(
                    inst.url + path, data=data,
                    headers={"Content-Type": "application/json", "X-Request-Id": xrid}) as r:
                ctype = r.headers.get("Content-Type", "application/json")
                if not ctype.startswith("text/event-stream"):
                    raw = await r.read()
                    if r.status != 200:
                        self.counts["errors"] += 1
                    return web.Response(status=r.status, body=raw, headers={
                        "Content-Type": ctype, "X-Request-Id": xrid})
                resp = web.StreamResponse(status=r.status, headers={
                    "Content-Type": ctype, "Cache-Control": "no-cache", "X-Request-Id": xrid})
                if state is not None:
                    state["resp"] = resp
                await resp.prepare(request)
                try:
                    async for chunk in r.content.iter_any():
                        try:
                            await resp.write(chunk)
                        except ConnectionResetError:
                            return resp     # the client went away: leaving closes the leg
                except (aiohttp.ClientError, OSError) as exc:
                    self.counts["errors"] += 1
                    await resp.write(_error_event(f"{inst.name} failed mid-stream: "
                                                  f"{exc.__class__.__name__}: {exc}"))
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, OSError) as exc:
            if resp is not None and resp.prepared:
                return resp         # the client went away while we wrote to it
            self.counts["errors"] += 1
            return _error(f"{inst.name} ({inst.host}:{inst.port}) failed: "
                          f"{exc.__class__.__name__}: {exc}", 502, xrid=xrid)
        finally:
            self._arrived(inst, xrid)

    def _background(self, coro):
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        return t

    # -- client API ------------------------------------------------------------------
    async def h_completions(self, request):
        return await self._route(request, "completion", "/v1/completions")

    async def h_chat(self, request):
        return await self._route(request, "chat", "/v1/chat/completions")

    async def _route(self, request, api, path):
        xrid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        self.counts["requests"] += 1
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.counts["errors"] += 1
            return _error("the body must be a JSON object", 400, "invalid_request_error", xrid)
        # text is tokenized in the front end's thread, off the loop every
        # instance of the process shares (server.Settings.front_end)
        if api == "chat" or has_text(body.get("prompt")):
            prompts = await self.s.in_front_end(self._prompts, body, api)
        else:
            prompts = self._prompts(body, api)
        pinst, rec = self.choose_prefill(prompts, xrid)
        if pinst is None:
            self.counts["errors"] += 1
            return _error("no live instance to route to", 503, xrid=xrid)
        if self.mode == "plain":
            return await self._pipe(request, pinst, path, raw, xrid)
        if self.mode == "sequential":
            return await self._sequential(request, api, path, body, prompts, pinst, rec, xrid)
        return await self._parallel(request, path, body, prompts, pinst, rec, xrid)

    async def _sequential(self, request, api, path, body, prompts, pinst, rec, xrid):
        pbody = dict(body, max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_KTP))
        if "max_completion_tokens" in pbody:
            pbody["max_completion_tokens"] = 1
        for key in ("stream_options", "min_tokens", "min_completion_tokens"):
            pbody.pop(key, None)
        try:
            status, raw, ctype = await self._call(pinst, path, pbody, xrid)
        except _LegError as exc:
            self.counts["errors"] += 1
            return _error(exc.message, 502, xrid=xrid)
        if status != 200:
            self.counts["errors"] += 1
            return web.Response(status=status, body=raw, headers={
                "Content-Type": ctype, "X-Request-Id": xrid})
        try:
            data = json.loads(raw)
            ktp = data.get("kv_transfer_params")
        except (ValueError, AttributeError):
            self.counts["errors"] += 1
            return _error(f"{pinst.name} answered the prefill leg with a body that is "
                          "not a JSON object", 502, xrid=xrid)
        if not ktp:
            # finished inside prefill (EOS on the first token): that is the answer
            return self._answer_from_prefill(api, body, data, xrid)
        plen = (sum(len(x) for x in prompts) if prompts
                else (data.get("usage") or {}).get("prompt_tokens", 0))
        dinst = self.choose_decode(plen, xrid, rec)
        if dinst is None:
            self.counts["errors"] += 1
            return _error("no live decode instance", 503, xrid=xrid)
        return await self._pipe(request, dinst, path, dict(body, kv_transfer_params=ktp), xrid)

    def _answer_from_prefill(self, api, body, data, xrid):
        if not body.get("stream"):
            return web.json_response(data, headers={"X-Request-Id": xrid})
        base = {"id": data.get("id"), "created": data.get("created", int(time.time())),
                "model": data.get("model")}
        events = []
        if api == "chat":
            obj = "chat.completion.chunk"
            events.append(dict(base, object=obj, choices=[{
                "index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}]))
            for ch in data.get("choices", []):
                events.append(dict(base, object=obj, choices=[{
                    "index": ch.get("index", 0),
                    "delta": {"content": (ch.get("message") or {}).get("content", "")},
                    "logprobs": None, "finish_reason": ch.get("finish_reason"),
                    "stop_reason": None}]))
        else:
            obj = "text_completion"
            for ch in data.get("choices", []):
                events.append(dict(base, object=obj, choices=[{
                    "index": ch.get("index", 0), "text": ch.get("text", ""),
                    "logprobs": None, "finish_reason": ch.get("finish_reason"),
                    "stop_reason": None}]))
        so = body.get("stream_options")
        if isinstance(so, dict) and so.get("include_usage"):
            events.append(dict(base, object=obj, choices=[], usage=data.get("usage")))
        text = "".join("data: " + json.dumps(ev) + "\n\n" for ev in events) + "data: [DONE]\n\n"
        return web.Response(body=text.encode(), headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Request-Id": xrid})

    async def _parallel(self, request, path, body, prompts, pinst, rec, xrid):
        plen = sum(len(x) for x in prompts) if prompts else 0
        dinst = self.choose_decode(plen, xrid, rec)
        if dinst is None:
            self._arrived(pinst, xrid)
            self.counts["errors"] += 1
            return _error("no live decode instance", 503, xrid=xrid)
        n = len(prompts) if prompts else 1
        rooms = [random.getrandbits(63) for _ in range(n)]
        if n == 1:
            boot = {"bootstrap_host": pinst.host, "bootstrap_port": pinst.bootstrap_port,
                    "bootstrap_room": rooms[0]}
        else:
            boot = {"bootstrap_host": [pinst.host] * n,
                    "bootstrap_port": [pinst.bootstrap_port] * n, "bootstrap_room": rooms}
        body = dict(body, **boot)
        state = {"resp": None, "failed": None}
        pipe = asyncio.ensure_future(self._pipe(request, dinst, path, body, xrid, state))
        pre = self._background(self._call(pinst, path, body, xrid))

        def prefill_done(t):
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                state["failed"] = (502, None, exc.message if isinstance(exc, _LegError)
                                   else repr(exc))
            elif t.result()[0] != 200:
                status, raw, _ = t.result()
                state["failed"] = (status, raw, f"{pinst.name} answered {status}")
            if state["failed"] is not None and not pipe.done():
                pipe.cancel()       # a failed prefill cancels the decode leg at once
        pre.add_done_callback(prefill_done)
        try:
            resp = await pipe
        except asyncio.CancelledError:
            if state["failed"] is None:
                pre.cancel()        # the client went away: drop both legs
                raise
            self.counts["errors"] += 1
            status, raw, message = state["failed"]
            resp = state["resp"]
            if resp is None:
                if raw is not None:
                    return web.Response(status=status, body=raw, headers={
                        "Content-Type": "application/json", "X-Request-Id": xrid})
                return _error(message, status, xrid=xrid)
            try:
                await resp.write(_error_event(f"prefill leg failed: {message}", status))
                await resp.write_eof()
            except (ConnectionError, RuntimeError):
                pass                # the client is gone too
            return resp
        finally:
            if not pipe.done():
                pipe.cancel()
        if resp.status != 200 and not pre.done():
            pre.cancel()            # a failed decode cancels the prefill leg
        return resp

    async def h_models(self, request):
        for inst in self.prefill_tier + self.decode_tier:
            if inst.dead:
                continue
            try:
                async with self.session.get(inst.url + "/v1/models") as r:
                    return web.Response(status=r.status, body=await r.read(), headers={
                        "Content-Type": r.headers.get("Content-Type", "application/json")})
            except (aiohttp.ClientError, OSError):
                continue
        return _error("no live instance", 503)

    async def h_health(self, request):
        ok = all(any(not i.dead for i in tier)
                 for tier in (self.prefill_tier, self.decode_tier) if tier)
        return web.Response(status=200 if ok else 503)

    async def h_stats(self, request):
        try:
            n = int(request.query.get("decisions", "0"))
        except ValueError:
            return _error("decisions must be an integer", 400, "invalid_request_error")
        d = dict(self.counts, mode=self.mode, engine=self.kind, slack=self.slack,
                 prefill_tier=[i.name for i in self.prefill_tier],
                 decode_tier=[i.name for i in self.decode_tier],
                 in_transit={k: len(v) for k, v in self.transit.items()})
        if n > 0:
            d["recent"] = list(self.recent)[-n:]
        return web.json_response(d)
