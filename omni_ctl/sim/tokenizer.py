"""Tokenizers for the simulator.

`BuiltinTokenizer` is deterministic and needs no files: words from a fixed
generated vocabulary map to fixed ids (so generated text round-trips), any other
piece is hashed into the rest of the id space. `HFTokenizer` wraps a local
transformers tokenizer (`--model-path`). Both expose the same small interface:

    encode(text, add_special_tokens) -> list[int]
    render_chat(messages, tools, add_generation_prompt, kwargs,
                continue_final_message, add_special_tokens) -> list[int]
    piece(token_id) -> str              text of one generated token
    gen_ids                             ids the simulated model may generate
    eos_id, vocab_size
    canonical(ids) -> bool | None       would encode(decode(ids)) give ids back
    round_trips                         whether canonical() can ever answer
"""

import functools
import re
import zlib

_SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>",
             "<|tool|>", "<|end|>"]
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in _SPECIALS) + ")")
_PIECE_RE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


class ChatTemplateError(ValueError):
    pass


def _word(i):
    # deterministic pronounceable pseudo-words: cv cv (cv)
    out = []
    n = i
    for _ in range(3):
        out.append(_CONSONANTS[n % len(_CONSONANTS)])
        n //= len(_CONSONANTS)
        out.append(_VOWELS[n % len(_VOWELS)])
        n //= len(_VOWELS)
        if n == 0 and len(out) >= 4:
            break
    return "".join(out)


def _content_text(content):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return str(content)


class BuiltinTokenizer:
    name = "builtin"
    round_trips = False
    vocab_size = 128256
    bos_id = 1
    eos_id = 2
    _WORDS = 8192
    _WORD_BASE = 256

    def __init__(self):
        self.special_ids = {s: i for i, s in enumerate(_SPECIALS)}
        self.words = [" " + _word(i) for i in range(self._WORDS)]
        self.word_ids = {w: self._WORD_BASE + i for i, w in enumerate(self.words)}
        self.gen_ids = list(range(self._WORD_BASE, self._WORD_BASE + self._WORDS))
        self._hash_base = self._WORD_BASE + self._WORDS
        self._hash_span = self.vocab_size - self._hash_base

    def _piece_id(self, piece):
        tid = self.word_ids.get(piece)
        if tid is None:
            tid = self._hash_base + zlib.crc32(piece.encode("utf-8")) % self._hash_span
        return tid

    def encode(self, text, add_special_tokens=True):
        ids = [self.bos_id] if add_special_tokens else []
        for chunk in _SPECIAL_RE.split(text):
            if not chunk:
                continue
            sid = self.special_ids.get(chunk)
            if sid is not None:
                ids.append(sid)
                continue
            ids.extend(self._piece_id(p) for p in _PIECE_RE.findall(chunk))
        return ids

    def render_chat(self, messages, tools=None, add_generation_prompt=True,
                    kwargs=None, continue_final_message=False,
                    add_special_tokens=False):
        parts = ["<s>"]
        if tools:
            parts.append("<|tool|>\n" + " ".join(
                str(t.get("function", {}).get("name", "")) if isinstance(t, dict)
                else str(t) for t in tools) + "<|end|>\n")
        for m in messages:
            role = m.get("role", "user")
            tag = {"system": "<|system|>", "user": "<|user|>",
                   "assistant": "<|assistant|>"}.get(role, "<|tool|>")
            parts.append(f"{tag}\n{_content_text(m.get('content'))}<|end|>\n")
        if continue_final_message and messages:
            parts[-1] = parts[-1][:-len("<|end|>\n")]
        elif add_generation_prompt:
            parts.append("<|assistant|>\n")
        return self.encode("".join(parts), add_special_tokens=add_special_tokens)

    def piece(self, tid):
        if self._WORD_BASE <= tid < self._hash_base:
            return self.words[tid - self._WORD_BASE]
        return ""

    def canonical(self, ids):
        # hashed pieces cannot be decoded, so the round trip is unknown
        return None


class HFTokenizer:
    """A local transformers tokenizer (no network: pass a directory)."""

    round_trips = True

    def __init__(self, path, chat_template=None):
        from transformers import AutoTokenizer  # heavy import, only when asked

        self.name = str(path)
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if chat_template is not None:
            self.tok.chat_template = chat_template
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id
        self.eos_id = eos if eos is not None else 0
        vocab = self.tok.get_vocab()
        word = re.compile(r"(Ġ|▁)[a-z]{3,8}")
        ids = sorted(i for s, i in vocab.items() if word.fullmatch(s))
        if len(ids) < 64:   # not a byte-level BPE / sentencepiece vocab
            ids = [i for i in range(min(self.vocab_size, 5000))
                   if self.tok.decode([i]).strip().isalpha()]
        special = set(self.tok.all_special_ids)
        self.gen_ids = [i for i in ids if i not in special and i != self.eos_id]
        self._pieces = {}
        # In P/D both legs of a request bring the engines the same prompt:
        # the long ones' encodings and round trips are remembered (what the
        # engine is charged for tokenizing is simulated time, not this)
        self._encode_long = functools.lru_cache(32)(
            lambda text, special: tuple(self.tok.encode(text, add_special_tokens=special)))
        self._round_trip_long = functools.lru_cache(32)(self._round_trip)

    _LONG = 4096    # characters (a quarter of it in ids) from which to remember

    def encode(self, text, add_special_tokens=True):
        if len(text) < self._LONG:
            return self.tok.encode(text, add_special_tokens=add_special_tokens)
        return list(self._encode_long(text, add_special_tokens))

    def render_chat(self, messages, tools=None, add_generation_prompt=True,
                    kwargs=None, continue_final_message=False,
                    add_special_tokens=False):
        """The ids vLLM gives a chat request: its conversation (the rules
        are omni_ctl.tokenizer.core's), rendered, encoded without special
        tokens unless asked.  Non-text content parts are dropped."""
        from ..tokenizer import core

        if not self.tok.chat_template:
            raise ChatTemplateError(
                "the tokenizer has no chat template; start the simulator "
                "with --chat-template FILE")
        msgs = [dict(m, content=[p for p in m["content"] if not isinstance(p, dict)
                                 or p.get("type") in core.TEXT_PARTS])
                if isinstance(m, dict) and isinstance(m.get("content"), list) else m
                for m in messages]
        try:
            conv, _ = core.engine_conversation(msgs)
            tools = core.engine_tools(tools)
        except (core.BadRequest, core.Unsupported) as exc:
            raise ChatTemplateError(str(exc)) from None
        kw = {"add_generation_prompt": add_generation_prompt,
              "continue_final_message": continue_final_message}
        kw.update(kwargs or {})
        text = self.tok.apply_chat_template(conv, tools=tools, tokenize=False, **kw)
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def piece(self, tid):
        p = self._pieces.get(tid)
        if p is None:
            p = self.tok.decode([tid])
            self._pieces[tid] = p
        return p

    def canonical(self, ids):
        if len(ids) < self._LONG // 4:
            return self._round_trip(ids)
        return self._round_trip_long(tuple(ids))

    def _round_trip(self, ids):
        ids = list(ids)
        if getattr(self.tok, "clean_up_tokenization_spaces", False):
            text = self.tok.decode(ids)
        else:
            # what decode() gives without the clean-up, through the batch
            # call, which lets the event loop run meanwhile (the single
            # decode holds the GIL: 13 ms at 60k tokens)
            text = self.tok.backend_tokenizer.decode_batch(
                [ids], skip_special_tokens=False)[0]
        return self.tok.encode(text, add_special_tokens=False) == ids or \
            self.tok.encode(text, add_special_tokens=True) == ids


def load_tokenizer(model_path=None, chat_template_path=None):
    if not model_path:
        return BuiltinTokenizer()
    template = None
    if chat_template_path:
        with open(chat_template_path, encoding="utf-8") as fh:
            template = fh.read()
    return HFTokenizer(model_path, template)
