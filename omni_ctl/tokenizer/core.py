"""Tokenization as the engines do it, with a multi-turn reuse cache.

`ModelTokenizer` loads a local model directory with transformers (fast
tokenizer, local files only) and answers the two routes:

  /v1/completions        `prompt` as a string or a list of strings -> ids
                         (`add_special_tokens`, default true, as vLLM);
                         token-id prompts are not tokenized (IdsGiven)
  /v1/chat/completions   the conversation vLLM builds from `messages`
                         (engine_conversation), rendered by transformers'
                         apply_chat_template with `tools`,
                         `add_generation_prompt`, `continue_final_message`,
                         `chat_template_kwargs`, then encoded with
                         add_special_tokens=False (the template writes BOS),
                         as vLLM and SGLang do

Reuse: a text is cut at the end of "boundary" tokens (added tokens such as
`<｜User｜>` that no other added token contains).  The tokenizer splits its
input at added tokens and encodes the pieces independently, so

    encode(T) == encode(T[:b]) + encode(s + T[b:])[1:]

when T[:b] ends with such a token s (encoding s + rest reproduces the
context to the right of s exactly).  The cache maps a digest of T[:b] to the
ids of T[:b]; a new text looks up its longest cached boundary and encodes
only the rest.  Both joints are checked (the prefix ids end with s's id, the
rest's ids start with it) and every boundary token is probed at load time;
anything unexpected falls back to encoding the whole text.

Answer learning: a chat request tokenized with learn=True gets a handle
naming what it needs to render again (the conversation, tools, template
kwargs); `learn(handle, answer)` renders the conversation with the engine's
answer appended and a placeholder next user message, encodes it through the
same reuse path and caches it, so the next turn (which resends the answer)
encodes only its new message.  Learned ids are keyed like any others (a
digest of the exact rendered text up to a boundary): an edited answer never
matches them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from array import array
from collections import OrderedDict

# no network, no tokenizer threads (the service runs one process per core)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ROUTES = (COMPLETIONS, CHAT)

# content part types an engine turns into placeholders we cannot reproduce
TEXT_PARTS = ("text", "refusal")
# assistant fields vLLM keeps for the template; SGLang's router does not
# forward ids when they are present
_REASONING_KEYS = ("reasoning_content", "reasoning")
_PROBE_LEFT = ("Hello wor", "", " 12", "中文")
_PROBE_RIGHT = ("ld again", " x", "\n\n  y", "12", "")
# boundaries kept per cached text (the last ones: a next turn shares most)
_KEYS_PER_TEXT = 64
# id lists at least this long are lined up with their boundaries by numpy
_NUMPY_FROM = 4096
# the next user message a learned answer is rendered with: the text up to
# its role marker is what the next turn renders (the placeholder itself is
# never reused: no boundary lies after it)
LEARN_NEXT = {"role": "user", "content": "."}


class BadRequest(ValueError):
    """The engine would answer 400 to this request; the message says why."""


class Unsupported(ValueError):
    """This request cannot be tokenized exactly here (the proxy falls back
    to its estimate; the engine may still accept it)."""


class IdsGiven(Exception):
    """The request's prompt is already token ids."""


class Result:
    __slots__ = ("prompts", "chat", "sglang_safe", "reused", "handle")

    def __init__(self, prompts, chat=False, sglang_safe=False, reused=0, handle=None):
        self.prompts = prompts
        self.chat = chat
        self.sglang_safe = sglang_safe
        self.reused = reused
        self.handle = handle


# ---------------------------------------------------------------------------
# the conversation the engine renders


def _text_of(content, where):
    """The text of a message's content (vLLM's "string" content format:
    text parts joined with newlines); (text, had_parts)."""
    if content is None:
        return "", False
    if isinstance(content, str):
        return content, False
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string, an array of "
                         "content parts or null")
    texts = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadRequest(f"{where}.content[{i}] must be an object with a 'type'")
        if part["type"] not in TEXT_PARTS:
            raise Unsupported(f"{where}.content[{i}] is a {part['type']!r} part")
        text = part.get(part["type"])
        if not isinstance(text, str):
            raise BadRequest(f"{where}.content[{i}].{part['type']} must be a string")
        texts.append(text)
    return "\n".join(texts), True


def _tool_call(call, where):
    if not isinstance(call, dict):
        raise BadRequest(f"{where} must be an object")
    call = dict(call)
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        # vLLM hands templates the arguments as an object
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            args = None
        if isinstance(args, dict):
            call["function"] = dict(fn, arguments=args)
    return call


def engine_conversation(messages):
    """The messages as vLLM passes them to the template: role, content as
    text, and only name, tool_calls (arguments parsed), tool_call_id and the
    reasoning fields.  Returns (conversation, sglang_safe)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array")
    conv = []
    safe = True
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise BadRequest(f"{where}.role is required and must be a string")
        text, parts = _text_of(m.get("content"), where)
        safe = safe and not parts
        out = {"role": role, "content": text}
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise BadRequest(f"{where}.tool_calls must be an array")
            out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]")
                                 for j, c in enumerate(calls)]
        if role == "tool" and m.get("tool_call_id") is not None:
            out["tool_call_id"] = m["tool_call_id"]
        for key in _REASONING_KEYS:
            if role == "assistant" and m.get(key) is not None:
                out[key] = m[key]
                safe = False
        conv.append(out)
    if conv[-1]["role"] == "assistant":
        safe = False
    return conv, safe


def engine_tools(tools):
    """`tools` as vLLM dumps its pydantic models: type, function with name,
    description and parameters (null when absent)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"tools[{i}].function.name is required")
        out.append({"type": t.get("type", "function"),
                    "function": {"name": fn["name"],
                                 "description": fn.get("description"),
                                 "parameters": fn.get("parameters")}})
    return out


def template_kwargs(body):
    """The keyword arguments vLLM renders a chat body's template with, and
    whether they are the plain ones (generation prompt, nothing else)."""
    gen = _flag(body, "add_generation_prompt", True)
    cont = _flag(body, "continue_final_message", False)
    if gen and cont:
        raise BadRequest("Cannot set both `continue_final_message` and "
                         "`add_generation_prompt` to True.")
    extra = body.get("chat_template_kwargs")
    if extra is not None and not isinstance(extra, dict):
        raise BadRequest("'chat_template_kwargs' must be an object")
    kwargs = {"add_generation_prompt": gen, "continue_final_message": cont,
              "documents": body.get("documents")}
    if body.get("reasoning_effort") is not None:
        kwargs["reasoning_effort"] = body["reasoning_effort"]
    # the request's kwargs win, except those that would change what
    # rendering returns (vLLM drops them too)
    kwargs.update({k: v for k, v in (extra or {}).items()
                   if k not in ("tokenize", "chat_template")})
    plain = (not extra and not cont and kwargs["documents"] is None
             and "reasoning_effort" not in kwargs)
    return kwargs, plain


# the message keys of a plain conversation (engine_conversation makes
# role, content and name strings, and learn() adds only such messages;
# transformers adds aliases for reasoning fields, which the direct render
# does not)
_PLAIN_KEYS = frozenset(("role", "content", "name"))

# conversations the direct render is checked on at load (with and without
# the generation prompt) against apply_chat_template
_PLAIN_PROBES = (
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 世界 🙂"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a\n\n b"},
     {"role": "assistant", "content": "c"}, {"role": "user", "content": " d "}],
    [{"role": "user", "content": "x", "name": "n"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "{{ y }} {% z %}"}],
)


def _flag(body, key, default):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"'{key}' must be a boolean")
    return v


# ---------------------------------------------------------------------------
# the reuse cache


class _Entry:
    __slots__ = ("ids", "keys", "live")

    def __init__(self, ids, keys):
        self.ids = ids
        self.keys = keys
        self.live = len(keys)       # keys still pointing here


class ReuseCache:
    """digest of a text prefix ending at a boundary -> the ids of that
    prefix (a slice of a cached text's ids); LRU by tokens held."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0
        self.index = {}             # digest -> (entry, ntokens)
        self.lru = OrderedDict()    # id(entry) -> entry

    def find(self, digests):
        """(j, ids, ntokens) for the last digests[j] cached, else None."""
        for j in range(len(digests) - 1, -1, -1):
            hit = self.index.get(digests[j])
            if hit is not None:
                entry, n = hit
                self.lru.move_to_end(id(entry))
                return j, entry.ids, n
        return None

    def add(self, ids, keys):
        """Cache ids under keys [(digest, ntokens)]."""
        if not keys or len(ids) > self.max_tokens:
            return
        entry = _Entry(ids, [k for k, _ in keys])
        for digest, n in keys:
            old = self.index.get(digest)
            self.index[digest] = (entry, n)
            if old is not None and old[0] is not entry:
                # a next turn re-caches the same prefixes: an entry none of
                # whose keys lead to it any more is dropped at once
                old[0].live -= 1
                if old[0].live == 0:
                    self._drop(old[0])
        self.lru[id(entry)] = entry
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            _, old = self.lru.popitem(last=False)
            self.tokens -= len(old.ids)
            for digest in old.keys:
                hit = self.index.get(digest)
                if hit is not None and hit[0] is old:
                    del self.index[digest]

    def _drop(self, entry):
        if self.lru.pop(id(entry), None) is not None:
            self.tokens -= len(entry.ids)

    def clear(self):
        self.index.clear()
        self.lru.clear()
        self.tokens = 0


def _kept(digests, at, offset):
    """The cache keys of the last _KEYS_PER_TEXT boundaries: (digest, token
    count up to and including the boundary's token at position at[j])."""
    first = max(0, len(at) - _KEYS_PER_TEXT)
    return [(digests[j], offset + at[j] + 1) for j in range(first, len(at))]


def _trie_pattern(words):
    """A regex matching the longest of words at a position, as a trie (one
    branch per next character instead of one per word: an added-token
    vocabulary shares long prefixes)."""
    root = {}
    for w in words:
        node = root
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def walk(node):
        alts = [re.escape(ch) + walk(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        # ending here is tried last: the longest word wins
        return f"(?:{body})?" if "" in node else body
    return walk(root)


class _Prefix:
    __slots__ = ("text", "bounds", "digests", "hash")

    def __init__(self, text, bounds, digests, h):
        self.text, self.bounds, self.digests, self.hash = text, bounds, digests, h


class Prefixes:
    """Texts scanned lately, each up to its last boundary, with their
    boundaries, digests and the hash there: a text that begins with one
    (checked character by character: str.startswith) is scanned and hashed
    only from there on, with the same result as from its start.  Found by
    their first K characters, K the longest of _HEADS they have (so that
    conversations sharing a system prompt shorter than K are told apart by
    what follows it), a few per head; LRU, at most max_chars characters in
    all."""

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self.chars = 0
        self.heads = OrderedDict()      # head -> [_Prefix], newest first

    def find(self, text):
        """The longest remembered prefix of text (text itself included),
        or None (a prefix under a longer head is longer than any under a
        shorter one)."""
        for k in _HEADS:
            if len(text) < k:
                continue
            bucket = self.heads.get(text[:k])
            if not bucket:
                continue
            best = None
            for pre in bucket:
                if len(pre.text) <= len(text) \
                        and (best is None or len(pre.text) > len(best.text)) \
                        and text.startswith(pre.text):
                    best = pre
            if best is not None:
                return best
        return None

    def remember(self, text, bounds, digests, h):
        end = bounds[-1][0]
        if end < _HEADS[-1] or end > self.max_chars:
            return
        head = text[:next(k for k in _HEADS if k <= end)]
        bucket = self.heads.pop(head, None) or []
        pre = _Prefix(text if end == len(text) else text[:end], bounds, digests, h)
        for old in bucket:
            if old.text == pre.text:
                bucket.remove(old)
                self.chars -= len(old.text)
                break
        bucket.insert(0, pre)
        self.chars += end
        while len(bucket) > _PER_HEAD:
            self.chars -= len(bucket.pop().text)
        self.heads[head] = bucket
        while self.chars > self.max_chars and self.heads:
            _, gone = self.heads.popitem(last=False)
            self.chars -= sum(len(x.text) for x in gone)


# texts remembered by their first K characters (K in _HEADS, the longest
# they have), _PER_HEAD of each
_HEADS = (8192, 1024, 64)
_PER_HEAD = 8


# ---------------------------------------------------------------------------
# the tokenizer


class ModelTokenizer:
    """One model's tokenizer, chat template and reuse cache (one per
    process: nothing here is shared between workers)."""

    def __init__(self, model_path, chat_template: str | None = None,
                 reuse: bool = True, cache_tokens: int = 8 << 20,
                 verify_rate: float = 0.0, learn_handles: int = 4096):
        from transformers import AutoTokenizer  # heavy: only when serving

        self.model_path = str(model_path)
        try:
            self.tok = AutoTokenizer.from_pretrained(
                self.model_path, local_files_only=True, use_fast=True)
        except Exception as exc:
            raise ValueError(f"cannot load a tokenizer from {self.model_path}: "
                             f"{exc}") from None
        self.backend = getattr(self.tok, "backend_tokenizer", None)
        if self.backend is None:
            raise ValueError(f"{self.model_path}: no fast tokenizer (tokenizer.json)")
        if chat_template is not None:
            self.tok.chat_template = chat_template
        self._plain_tmpl = self._plain_template() if self.tok.chat_template else None
        self.vocab_size = len(self.tok)
        # the same ids without the character offsets nobody here reads
        # (tokenizers >= 0.20): a third less time per encode
        self._fast = getattr(self.backend, "encode_batch_fast", None)
        self.verify_rate = verify_rate
        self.cache = ReuseCache(cache_tokens)
        # texts scanned lately, to scan and hash only what a next one adds
        self.prefixes = Prefixes(cache_tokens)
        self.stats = {"requests": 0, "texts": 0, "tokens": 0, "reused_tokens": 0,
                      "reuse_hits": 0, "reuse_joint_fallbacks": 0,
                      "reuse_verified": 0, "reuse_mismatches": 0,
                      # texts scanned and hashed from a remembered prefix
                      "prefix_hits": 0,
                      "bad_requests": 0, "unsupported": 0,
                      # requests whose client had closed the connection
                      # before they were read (server: never tokenized)
                      "abandoned": 0,
                      "busy_s": 0.0, "cpu_s": 0.0,
                      # requests tokenized whole on request (server `?reuse=0`)
                      "noreuse_requests": 0, "noreuse_busy_s": 0.0,
                      "noreuse_cpu_s": 0.0,
                      # chat templates rendered directly (_apply_template)
                      "render_direct": 0, "render_verified": 0,
                      "render_mismatches": 0,
                      # answer learning (see learn())
                      "handles": 0, "learn_received": 0, "learned": 0,
                      "learn_unknown": 0, "learn_failed": 0, "learn_bad": 0,
                      "learn_tokens": 0, "learn_encoded_tokens": 0,
                      "learn_busy_s": 0.0, "learn_cpu_s": 0.0}
        # handle -> (conversation, tools, kwargs, plain, special), oldest first
        self.learn_handles = learn_handles
        self.pending = OrderedDict()
        self._next_handle = 0
        self.learning = False       # handles only where answers are read
        self.lead = self._lead_ids()
        self._boundary_re, self._first_chars, self.boundary_ids = None, [], {}
        if reuse:
            self._find_boundaries()
        self._warm_up()

    def _warm_up(self):
        """Pay the one-time costs at load, not in the first request: the
        chat template's compilation, numpy's import (the reuse keys)."""
        if self.boundary_ids:
            import numpy  # noqa: F401
        if self.tok.chat_template:
            try:
                self.tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                             tokenize=False, add_generation_prompt=True)
            except Exception:   # noqa: BLE001 - a template error shows per request
                pass

    # -- load-time facts -----------------------------------------------------
    def _enc(self, text, special=False):
        try:
            if self._fast is not None:
                return self._fast([text], add_special_tokens=special)[0].ids
            return self.backend.encode(text, add_special_tokens=special).ids
        except Exception as exc:    # the library's: e.g. a lone surrogate
            raise BadRequest(f"cannot tokenize the prompt: {exc}") from None

    def _lead_ids(self):
        """The ids add_special_tokens=True puts before the text (BOS), or
        None when it adds anything else (then such texts are not reused)."""
        leads = set()
        for probe in ("a", "Hello world", " 中文 12"):
            with_sp, without = self._enc(probe, True), self._enc(probe, False)
            k = len(with_sp) - len(without)
            if k < 0 or with_sp[k:] != without:
                return None
            leads.add(tuple(with_sp[:k]))
        return list(leads.pop()) if len(leads) == 1 else None

    def _find_boundaries(self):
        added = {}
        for tid, tok in self.backend.get_added_tokens_decoder().items():
            if tok.content:
                added[tok.content] = (tid, tok)
        contents = sorted(added, key=len, reverse=True)
        if not contents:
            return
        safe = {}
        for s, (tid, tok) in added.items():
            if tok.single_word:
                continue
            # contained in another added token: a match may span the cut
            if any(s != o and s in o for o in contents if len(o) > len(s)):
                continue
            if self._probe(s, tid):
                safe[s] = tid
        if not safe:
            return
        # all added tokens, longest match first, the way the tokenizer
        # matches them; only the safe ones become boundaries
        self._boundary_re = re.compile(_trie_pattern(contents))
        self._first_chars = sorted({c[0] for c in contents})
        self.boundary_ids = safe

    def _probe(self, s, tid):
        for left in _PROBE_LEFT:
            head = self._enc(left + s)
            if not head or head[-1] != tid:
                return False
            for right in _PROBE_RIGHT:
                tail = self._enc(s + right)
                if not tail or tail[0] != tid:
                    return False
                if self._enc(left + s + right) != head + tail[1:]:
                    return False
        return True

    # -- text -> ids -----------------------------------------------------------
    def _boundaries(self, text, start=0):
        """[(end position, id, token)] of boundary tokens in text[start:]
        (start: the end of a boundary token, where the scan of the whole
        text would be too: a boundary is part of no other added token)."""
        if self._boundary_re is None:
            return []
        # what finditer would find, but the regex is only tried where an
        # added token can start (str.find is far faster than its scan)
        starts = []
        for c in self._first_chars:
            i = text.find(c, start)
            while i >= 0:
                starts.append(i)
                i = text.find(c, i + 1)
        starts.sort()
        ids = self.boundary_ids
        out, end = [], start
        match = self._boundary_re.match
        for i in starts:
            if i < end:
                continue
            m = match(text, i)
            if m is None:
                continue
            end = m.end()
            tid = ids.get(m.group())
            if tid is not None:
                out.append((end, tid, m.group()))
        return out

    @staticmethod
    def _digests(text, bounds, h=None, prev=0):
        """The digest of the text up to each boundary (SHA-256: the fastest
        of hashlib's here where the CPU has SHA instructions), and the hash
        at the last one; h: the hash of text[:prev] to go on from."""
        h = hashlib.sha256() if h is None else h.copy()
        out = []
        for pos, _, _ in bounds:
            h.update(text[prev:pos].encode("utf-8", "surrogatepass"))
            out.append(h.copy().digest())
            prev = pos
        return out, h

    def _scan(self, text):
        """(bounds, digests) of text: the boundaries and the digests up to
        each, the part a remembered text (_Prefix) begins it with taken
        from there, only the rest scanned and hashed."""
        pre = self.prefixes.find(text)
        if pre is None:
            bounds = self._boundaries(text)
            digests, h = self._digests(text, bounds)
        else:
            self.stats["prefix_hits"] += 1
            p = len(pre.text)
            tail = self._boundaries(text, p)
            later, h = self._digests(text, tail, pre.hash, p)
            bounds, digests = pre.bounds + tail, pre.digests + later
        if bounds:
            self.prefixes.remember(text, bounds, digests, h)
        return bounds, digests

    @staticmethod
    def _keys(ids, bounds, digests, offset=0):
        """[(digest, offset + ntokens)] for the boundaries whose token sits
        where the text says; None when ids and text do not line up one to
        one."""
        if not bounds:
            return []
        want = [b[1] for b in bounds]
        if len(ids) < _NUMPY_FROM:
            # a reused turn's new tail: numpy's per-call costs would dominate;
            # index() scans in C, once per boundary kind (a handful)
            at = []
            for kind in set(want):
                i = -1
                try:
                    while True:
                        i = ids.index(kind, i + 1)
                        at.append(i)
                except ValueError:
                    pass
            at.sort()
            if len(at) == len(want) and all(
                    ids[i] == w for i, w in zip(at, want)):
                return _kept(digests, at, offset)
            return None
        import numpy as np

        arr = np.frombuffer(ids, dtype=np.uint32) if isinstance(ids, array) \
            else np.asarray(ids, dtype=np.uint32)
        want = np.asarray(want, dtype=np.uint32)
        at = np.flatnonzero(np.isin(arr, np.unique(want)))
        if len(at) != len(bounds) or not np.array_equal(arr[at], want):
            return None
        return _kept(digests, at.tolist(), offset)

    def _reused_keys(self, digests, j, n, tail, bounds):
        """The keys of a text whose first n ids came from the cache (its
        boundaries up to j) and whose rest is tail[1:]: the earlier
        boundaries' keys as the cache holds them (the same text before them,
        so the same ids), only the tail's positions searched; None when the
        tail does not line up."""
        later = self._keys(tail[1:], bounds[j + 1:], digests[j + 1:], n)
        if later is None:
            return None
        index = self.cache.index
        first = max(0, j + 1 + len(later) - _KEYS_PER_TEXT)
        earlier = [(digests[i], index[digests[i]][1])
                   for i in range(first, j) if digests[i] in index]
        return (earlier + [(digests[j], n)] + later)[-_KEYS_PER_TEXT:]

    def encode(self, text: str, add_special_tokens: bool, reuse: bool = True):
        """(ids, reused tokens) of one text, as the engine encodes it;
        reuse=False: the whole text, the cache neither read nor filled."""
        self.stats["texts"] += 1
        if reuse:
            ids, reused = self._encode(text, add_special_tokens)
        else:
            ids, reused = self._encode_whole(text, add_special_tokens), 0
        self.stats["tokens"] += len(ids)
        self.stats["reused_tokens"] += reused
        return ids, reused

    def _encode_whole(self, text, special):
        """The ids of text encoded whole (what a service without the cache
        does)."""
        if special and self.lead is None:
            return array("I", self._enc(text, True))
        return array("I", (self.lead if special else []) + self._enc(text))

    def _encode(self, text, special):
        lead = []
        if special:
            if self.lead is None:
                return self._encode_whole(text, special), 0
            lead = self.lead
        bounds, digests = self._scan(text)
        if not bounds:
            return self._encode_whole(text, special), 0
        ids, reused, whole, keys = None, 0, False, None
        hit = self.cache.find(digests)
        if hit is not None:
            j, cached, n = hit
            pos, tid, s = bounds[j]
            if cached[n - 1] == tid:
                if pos == len(text):
                    ids, whole = cached[:n], True
                else:
                    tail = self._enc(s + text[pos:])
                    if tail and tail[0] == tid:
                        ids = cached[:n] + array("I", tail[1:])
                        keys = self._reused_keys(digests, j, n, tail, bounds)
            if ids is None:
                self.stats["reuse_joint_fallbacks"] += 1
            else:
                reused = n
                self.stats["reuse_hits"] += 1
                if self.verify_rate and random.random() < self.verify_rate:
                    self.stats["reuse_verified"] += 1
                    full = self._enc(text)
                    if ids.tolist() != full:
                        self.stats["reuse_mismatches"] += 1
                        ids, reused, whole, keys = array("I", full), 0, False, None
        if ids is None:
            ids = array("I", self._enc(text))
        if not whole:
            if keys is None:
                keys = self._keys(ids, bounds, digests)
            self.cache.add(ids, keys or [])
        if lead:
            ids = array("I", lead) + ids
        return ids, reused

    # -- the two routes --------------------------------------------------------
    def tokenize(self, route: str, body, learn: bool = False,
                 reuse: bool = True) -> Result:
        """The answer for one request body (already parsed JSON); learn: a
        chat answer carries a handle for learn(); reuse=False: tokenized
        whole, the reuse cache neither read nor filled (a benchmark's
        comparison in the same process: server.App, `?reuse=0`)."""
        self.stats["requests"] += 1
        try:
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            if route == COMPLETIONS:
                return self.completions(body, reuse)
            if route == CHAT:
                return self.chat(body, learn and reuse, reuse)
            raise ValueError(f"unknown route {route!r}")
        except BadRequest:
            self.stats["bad_requests"] += 1
            raise
        except Unsupported:
            self.stats["unsupported"] += 1
            raise

    def completions(self, body, reuse: bool = True) -> Result:
        prompt = body.get("prompt")
        special = _flag(body, "add_special_tokens", True)
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                texts = prompt
            elif all(type(t) is int for t in prompt) or all(
                    isinstance(p, list) and p and all(type(t) is int for t in p)
                    for p in prompt):
                raise IdsGiven()
            else:
                raise BadRequest("'prompt' must be a string, an array of strings, "
                                 "an array of token ids or an array of arrays of "
                                 "token ids")
        elif prompt is None:
            raise BadRequest("'prompt' is required")
        else:
            raise BadRequest("'prompt' must be a non-empty string or array")
        out, reused = [], 0
        for t in texts:
            ids, r = self.encode(t, special, reuse)
            out.append(ids)
            reused += r
        return Result(out, reused=reused)

    def render(self, body) -> tuple[str, bool]:
        """The chat template's text for a chat body, and whether SGLang
        would render the same ids (see wire.FLAG_SGLANG_SAFE)."""
        text, safe, _ = self._render(body)
        return text, safe

    def _render(self, body):
        """render()'s text and flag, and what it rendered: (conversation,
        tools, template kwargs, whether they are plain), for learn()."""
        if not self.tok.chat_template:
            raise Unsupported("the tokenizer has no chat template (give the "
                              "service --chat-template FILE)")
        if body.get("chat_template") is not None:
            raise Unsupported("a request-supplied chat_template")
        conv, safe = engine_conversation(body.get("messages"))
        tools = engine_tools(body.get("tools"))
        kwargs, plain = template_kwargs(body)
        safe = safe and plain and not tools and body.get("functions") is None
        text = self._apply_template(conv, tools, kwargs, plain)
        return text, safe, (conv, tools, kwargs, plain)

    def _apply_template(self, conv, tools, kwargs, plain):
        """The engine's apply_chat_template(conv, tools, **kwargs) text; for
        a plain request (template_kwargs) of plain messages, the compiled
        template rendered directly with what transformers gives it
        (_plain_template, checked at load: half the time)."""
        if plain and tools is None and self._plain_tmpl is not None \
                and all(m.keys() <= _PLAIN_KEYS for m in conv):
            compiled, variables = self._plain_tmpl
            try:
                text = compiled.render(messages=conv, tools=None, documents=None,
                                       add_generation_prompt=kwargs["add_generation_prompt"],
                                       **variables)
            except Exception:   # noqa: BLE001 - the engine's path says what
                text = None
            if text is not None and not (self.verify_rate
                                         and random.random() < self.verify_rate):
                self.stats["render_direct"] += 1
                return text
            if text is not None:
                self.stats["render_verified"] += 1
                slow = self._apply_template(conv, tools, kwargs, False)
                if slow != text:
                    self.stats["render_mismatches"] += 1
                    self._plain_tmpl = None     # never again in this process
                return slow
        try:
            text = self.tok.apply_chat_template(conv, tools=tools, tokenize=False,
                                                **kwargs)
        except Exception as exc:    # jinja errors, raise_exception(), ...
            raise BadRequest(f"chat template error: {exc}") from None
        if not isinstance(text, str):
            raise BadRequest("the chat template did not render a string")
        return text

    def _plain_template(self):
        """(compiled template, variables) such that rendering the compiled
        template with messages, tools=None, documents=None,
        add_generation_prompt and the variables gives what
        apply_chat_template gives for plain messages (dicts of strings) and
        no other keyword: transformers' own compiled template and its
        special tokens map, which it passes through unchanged when they are
        strings.  None when this transformers does not show them, or when
        the two differ on the probes."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.tok.get_chat_template(None, None))
            variables = dict(self.tok.special_tokens_map)
        except Exception:   # noqa: BLE001 - another transformers: the slow path
            return None
        if not all(type(v) is str or (type(v) is list and all(type(x) is str for x in v))
                   for v in variables.values()):
            return None
        for conv in _PLAIN_PROBES:
            for gen in (True, False):
                kwargs = {"add_generation_prompt": gen, "continue_final_message": False,
                          "documents": None}
                try:
                    want = self.tok.apply_chat_template(conv, tools=None, tokenize=False,
                                                        **kwargs)
                except Exception:   # noqa: BLE001 - a template for other roles
                    continue
                try:
                    got = compiled.render(messages=conv, tools=None, documents=None,
                                          add_generation_prompt=gen, **variables)
                except Exception:   # noqa: BLE001
                    return None
                if got != want:
                    return None
        return compiled, variables

    def chat(self, body, learn: bool = False, reuse: bool = True) -> Result:
        text, safe, rendered = self._render(body)
        special = _flag(body, "add_special_tokens", False)
        ids, reused = self.encode(text, special, reuse)
        handle = None
        if learn and self.boundary_ids and self.learn_handles and self.learning \
                and not _flag(body, "continue_final_message", False):
            handle = self._remember(rendered, special)
        return Result([ids], chat=True, sglang_safe=safe and not special,
                      reused=reused, handle=handle)

    # -- answer learning -------------------------------------------------------
    def start_handles(self, index: int) -> None:
        """Handles of this process: its worker index in the top 16 bits
        (where the proxy sends the answer), a random 48-bit counter below
        (a restarted worker does not take an old handle for a new one)."""
        self._next_handle = (index & 0xFFFF) << 48 | random.getrandbits(48)
        self.learning = True

    def _remember(self, rendered, special):
        handle = self._next_handle
        self._next_handle = handle & ~0xFFFFFFFFFFFF | (handle + 1) & 0xFFFFFFFFFFFF
        self.pending[handle] = rendered + (special,)
        while len(self.pending) > self.learn_handles:
            self.pending.popitem(last=False)
        self.stats["handles"] += 1
        return handle

    def learn(self, handle: int, answer: str) -> bool:
        """Cache the conversation of handle rendered through the engine's
        answer (and the start of a next user message); False when the handle
        is unknown (never given, already used, or evicted) or rendering
        fails.  Counted apart from the requests (learn_* in stats)."""
        self.stats["learn_received"] += 1
        rec = self.pending.pop(handle, None)
        if rec is None:
            self.stats["learn_unknown"] += 1
            return False
        conv, tools, kwargs, plain, special = rec
        conv = conv + [{"role": "assistant", "content": answer}, dict(LEARN_NEXT)]
        try:
            text = self._apply_template(conv, tools, kwargs, plain)
            ids, reused = self._encode(text, special)
        except Exception:   # noqa: BLE001 - a template that rejects the shape
            self.stats["learn_failed"] += 1
            return False
        self.stats["learned"] += 1
        self.stats["learn_tokens"] += len(ids)
        self.stats["learn_encoded_tokens"] += len(ids) - reused
        return True
