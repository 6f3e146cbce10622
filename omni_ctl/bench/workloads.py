"""Workloads for `omni-ctl bench`: what to send, not when or how.

A workload is a list of sessions. A session is one conversation: a single request
for the trace, gsp and random workloads, several turns for multiturn (each turn
resends the growing history, so it can only start when the previous turn ended).

Prompt content is deterministic. Token ids and words come from a counter-based
generator (splitmix64) keyed by what the content stands for (a trace hash id, a
gsp group, a seed), so the same key always gives the same prompt, on any machine
and any Python, and equal keys give equal prefixes. One word stands for about one
token in text mode, so lengths given in tokens carry over to text prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field

import numpy as np

from .errors import BenchError

# Token ids are drawn from [TOKEN_LO, TOKEN_HI): inside every common vocabulary
# and above the ids tokenizers usually reserve for special tokens.
TOKEN_LO = 1000
TOKEN_HI = 30000

# Mooncake traces use one hash id per 512-token block.
TRACE_BLOCK_TOKENS = 512

WORKLOAD_KINDS = ("gsp", "multiturn", "random", "trace")
PROMPT_MODES = ("tokens", "text")

# Short common words, most of them one token in BPE vocabularies.
WORDS = tuple("""
the of and to in is that for it as was with be by on not he this are or his from at
which but have an had they you were their one all we can her has there been if more
when will would who so no time about out up into than them some could other what only
new its also two may first then do any like my now over such our man me even most made
after did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see
men work long here get both between life being under never day same another know while
last might us great old year off come since against go came right used take three
small place found part water light sound word house point page letter number answer
study learn plant cover food sun four thought let keep eye tree city cross farm hard
start story saw far sea draw left late run press close night real few north open seem
together next white children begin got walk example ease paper group always music mark
often until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main
enough plain girl usual young ready above ever red list though feel talk bird soon body
dog family direct pose leave song measure door product black short class wind question
happen complete ship area half rock order fire south problem piece told knew pass farm
top whole king space heard best hour better true during hundred five remember step early
hold west ground interest reach fast verb sing listen six table travel less morning
""".split())


# --- deterministic content -------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _stream(key: int, n: int) -> np.ndarray:
    """The first n outputs of splitmix64 started at state `key` (uint64 array)."""
    state = np.uint64(key & 0xFFFFFFFFFFFFFFFF) + np.arange(
        1, n + 1, dtype=np.uint64) * _GOLDEN
    z = (state ^ (state >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def content_key(*parts) -> int:
    """A 64-bit key for a named piece of content, e.g. ("gsp-system", seed, 3)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def token_block(key: int, n: int) -> list[int]:
    """n deterministic token ids for `key`."""
    span = np.uint64(TOKEN_HI - TOKEN_LO)
    return (_stream(key, n) % span + np.uint64(TOKEN_LO)).astype(np.int64).tolist()


def word_block(key: int, n: int) -> list[str]:
    """n deterministic words for `key` (about n tokens of text)."""
    idx = _stream(key, n) % np.uint64(len(WORDS))
    return [WORDS[i] for i in idx.tolist()]


def text_block(key: int, n: int) -> str:
    return " ".join(word_block(key, n))


# --- what a workload is made of --------------------------------------------

@dataclass
class Turn:
    """One request of a session. `prompt` is the user's text, or the whole
    prompt as token ids (token mode, /v1/completions only)."""
    prompt: str | list[int]
    max_tokens: int
    prompt_len: int          # intended prompt length in tokens (words for text)


@dataclass
class Session:
    index: int
    turns: list[Turn]
    system: str | None = None     # text mode: shared system prompt, if any
    arrival_s: float | None = None  # trace replay: arrival offset in seconds
    group: int | None = None
    history: list = field(default_factory=list)  # (user, assistant) as sent

    @property
    def multiturn(self) -> bool:
        return len(self.turns) > 1


# --- Mooncake traces --------------------------------------------------------

def _trace_key(hash_id: int) -> int:
    return content_key("trace-block", int(hash_id))


def trace_prompt_tokens(hash_ids, input_length: int,
                        block_tokens: int = TRACE_BLOCK_TOKENS) -> list[int]:
    """Token ids for a trace line: one block per hash id, concatenated, cut to
    input_length. Raises when the ids cannot cover input_length."""
    if input_length > len(hash_ids) * block_tokens:
        raise BenchError(
            f"trace line has input_length {input_length} but only "
            f"{len(hash_ids)} hash ids of {block_tokens} tokens")
    out: list[int] = []
    for hid in hash_ids:
        need = min(block_tokens, input_length - len(out))
        if need <= 0:
            break
        out.extend(_block_tokens_cached(int(hid), block_tokens)[:need])
    return out


def trace_prompt_text(hash_ids, input_length: int,
                      block_tokens: int = TRACE_BLOCK_TOKENS) -> str:
    """Text for a trace line: one block of `block_tokens` words per hash id,
    the last one cut so that the word count equals input_length."""
    if input_length > len(hash_ids) * block_tokens:
        raise BenchError(
            f"trace line has input_length {input_length} but only "
            f"{len(hash_ids)} hash ids of {block_tokens} tokens")
    words: list[str] = []
    for hid in hash_ids:
        need = min(block_tokens, input_length - len(words))
        if need <= 0:
            break
        words.extend(_block_words_cached(int(hid), block_tokens)[:need])
    return " ".join(words)


_BLOCK_CACHE_MAX = 4096
_token_cache: dict[tuple[int, int], list[int]] = {}
_word_cache: dict[tuple[int, int], list[str]] = {}


def _cached(cache, make, hid, n):
    k = (hid, n)
    v = cache.get(k)
    if v is None:
        if len(cache) >= _BLOCK_CACHE_MAX:
            cache.pop(next(iter(cache)))   # oldest inserted first
        v = cache[k] = make(_trace_key(hid), n)
    return v


def _block_tokens_cached(hid: int, n: int) -> list[int]:
    return _cached(_token_cache, token_block, hid, n)


def _block_words_cached(hid: int, n: int) -> list[str]:
    return _cached(_word_cache, word_block, hid, n)


class LazyTracePrompt:
    """A trace line's prompt built only when it is sent (a whole Mooncake
    trace as token ids would take gigabytes)."""
    __slots__ = ("hash_ids", "input_length", "mode")

    def __init__(self, hash_ids, input_length, mode):
        self.hash_ids = hash_ids
        self.input_length = input_length
        self.mode = mode

    def build(self):
        if self.mode == "tokens":
            return trace_prompt_tokens(self.hash_ids, self.input_length)
        return trace_prompt_text(self.hash_ids, self.input_length)


# traces shipped with the package, by name (`-w trace:mooncake`)
TRACES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces")
SHIPPED_TRACES = {"mooncake": "mooncake_synthetic_trace.jsonl"}


def trace_path(name_or_path: str) -> str:
    """A shipped trace's file for its name, else the path as given."""
    if name_or_path in SHIPPED_TRACES:
        return os.path.join(TRACES_DIR, SHIPPED_TRACES[name_or_path])
    return name_or_path


def read_trace(path: str) -> list[dict]:
    path = trace_path(path)
    if not os.path.isfile(path):
        raise BenchError(f"trace file '{path}' does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                ts = float(row["timestamp"])
                inp = int(row["input_length"])
                out = int(row["output_length"])
                ids = [int(h) for h in row["hash_ids"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise BenchError(
                    f"trace '{path}' line {lineno} is not a Mooncake record: {exc}")
            if inp <= 0 or out <= 0 or inp > len(ids) * TRACE_BLOCK_TOKENS:
                raise BenchError(
                    f"trace '{path}' line {lineno}: input_length {inp}, "
                    f"output_length {out} and {len(ids)} hash ids do not fit")
            rows.append({"timestamp": ts, "input_length": inp,
                         "output_length": out, "hash_ids": ids})
    if not rows:
        raise BenchError(f"trace '{path}' has no records")
    return rows


def trace_workload(path: str, num_requests: int | None, mode: str,
                   speedup: float = 1.0) -> list[Session]:
    rows = read_trace(path)
    if num_requests is not None:
        rows = rows[:num_requests]
    t0 = rows[0]["timestamp"]
    sessions = []
    for i, r in enumerate(rows):
        turn = Turn(LazyTracePrompt(r["hash_ids"], r["input_length"], mode),
                    r["output_length"], r["input_length"])
        sessions.append(Session(i, [turn],
                                arrival_s=(r["timestamp"] - t0) / 1000.0 / speedup))
    return sessions


# --- generated shared prefix (like sglang's generated-shared-prefix) -------

def gsp_workload(groups: int, prompts_per_group: int, system_len: int,
                 question_len: int, output_len: int, mode: str, seed: int,
                 num_requests: int | None = None) -> list[Session]:
    """groups x prompts_per_group requests; the requests of a group share a
    system prompt of system_len tokens and differ in a question of
    question_len tokens. Shuffled (seeded) so groups interleave."""
    for name, v in (("--gsp-groups", groups),
                    ("--gsp-prompts-per-group", prompts_per_group),
                    ("--gsp-output-len", output_len)):
        if v < 1:
            raise BenchError(f"{name} must be >= 1, got {v}")
    if system_len < 0 or question_len < 1:
        raise BenchError(
            f"--gsp-system-len must be >= 0 and --gsp-question-len >= 1, "
            f"got {system_len} and {question_len}")
    items = []
    for g in range(groups):
        sys_key = content_key("gsp-system", seed, g)
        system_tokens = token_block(sys_key, system_len) if mode == "tokens" else None
        system_text = text_block(sys_key, system_len) if mode == "text" else None
        for p in range(prompts_per_group):
            q_key = content_key("gsp-question", seed, g, p)
            if mode == "tokens":
                prompt = system_tokens + token_block(q_key, question_len)
                items.append((g, None, prompt))
            else:
                items.append((g, system_text, text_block(q_key, question_len)))
    random.Random(seed).shuffle(items)
    if num_requests is not None:
        if num_requests > len(items):
            raise BenchError(
                f"--num-requests {num_requests} is more than the gsp workload has "
                f"({groups} groups x {prompts_per_group} prompts = {len(items)})")
        items = items[:num_requests]
    return [Session(i, [Turn(prompt, output_len, system_len + question_len)],
                    system=system, group=g)
            for i, (g, system, prompt) in enumerate(items)]


# --- multi-turn chat ----------------------------------------------------------

def multiturn_workload(num_requests: int, turns: int, system_len: int,
                       user_len: int, output_len: int, seed: int) -> list[Session]:
    """Conversations of `turns` turns (the last one may be shorter so that
    the total is num_requests). Each turn's prompt is the system prompt, all
    earlier user messages and answers, and a new user message."""
    if turns < 1 or user_len < 1 or output_len < 1 or system_len < 0:
        raise BenchError(
            f"multiturn needs --mt-turns, --mt-user-len, --mt-output-len >= 1 "
            f"and --mt-system-len >= 0 (got {turns}, {user_len}, {output_len}, "
            f"{system_len})")
    sessions = []
    left = num_requests
    s = 0
    while left > 0:
        n = min(turns, left)
        system = text_block(content_key("mt-system", seed, s), system_len) \
            if system_len else None
        ts = [Turn(text_block(content_key("mt-user", seed, s, t), user_len),
                   output_len, user_len + (system_len if t == 0 else 0))
              for t in range(n)]
        sessions.append(Session(s, ts, system=system))
        left -= n
        s += 1
    return sessions


# --- random lengths -----------------------------------------------------------

def random_workload(num_requests: int, input_len: int, output_len: int,
                    range_ratio: float, mode: str, seed: int) -> list[Session]:
    """Independent prompts with lengths uniform in len*(1-r) .. len*(1+r)."""
    if not 0 <= range_ratio < 1:
        raise BenchError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise BenchError(
            f"--random-input-len and --random-output-len must be >= 1, "
            f"got {input_len} and {output_len}")
    rng = random.Random(seed)

    def pick(n):
        lo = max(1, int(n * (1 - range_ratio)))
        hi = max(lo, int(n * (1 + range_ratio)))
        return rng.randint(lo, hi)

    sessions = []
    for i in range(num_requests):
        n_in, n_out = pick(input_len), pick(output_len)
        key = content_key("random", seed, i)
        prompt = token_block(key, n_in) if mode == "tokens" else text_block(key, n_in)
        sessions.append(Session(i, [Turn(prompt, n_out, n_in)]))
    return sessions
