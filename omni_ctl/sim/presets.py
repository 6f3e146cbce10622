"""Engine presets: the cost model's coefficients and the engine's limits.

One step of an instance runs a batch that mixes prefill chunks and decodes.
Its duration is

    t = a + b * P + c * sum(p_i * (ctx_i + p_i / 2)) + e * D + f * K

where P is the number of prompt tokens computed in the step (p_i per request,
ctx_i the tokens that request already has in KV), D the number of decoding
requests and K the KV tokens those decodes attend over. `a` is the fixed cost
of a forward pass (weights read once), `b` the per-token linear cost, `c` the
attention cost per query-key pair, `e` the per-sequence cost, `f` the cost of
reading one cached token during decode. Sources and fits are documented in
docs/simulator.md.

`tokenize_per_token` is the engine front end's tokenization cost: a request
whose prompt arrives as text waits tokens x cost on the instance's one
tokenizer lane before it is scheduled; one that arrives as token ids (the
proxy's reuse forms) does not.
"""

from dataclasses import dataclass, asdict, replace


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    a: float            # s per step
    b: float            # s per prefill token
    c: float            # s per prefill query-key pair
    e: float            # s per decoding sequence
    f: float            # s per KV token read by a decode
    jitter: float       # relative std-dev of step time (0 = deterministic)
    num_blocks: int     # KV cache size in blocks
    block_size: int     # tokens per block
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    kv_transfer_base: float       # s per KV transfer (setup)
    kv_transfer_per_token: float  # s per transferred token
    tokenize_per_token: float = 0.0   # s per prompt token the engine tokenizes

    def as_dict(self):
        return asdict(self)

    def with_overrides(self, **kw):
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


PRESETS = {
    # Llama-3.1-8B-Instruct, BF16, one H100-80GB SXM, vLLM defaults.
    "llama3-8b-h100": Preset(
        name="llama3-8b-h100",
        description="Llama-3.1-8B BF16 on one H100 80GB (vLLM defaults)",
        a=6.40e-3, b=3.20e-5, c=1.06e-9, e=1.64e-4, f=4.0e-8,
        jitter=0.0,
        num_blocks=26000, block_size=16,
        max_num_seqs=256, max_num_batched_tokens=8192,
        max_model_len=131072,
        kv_transfer_base=1.0e-3, kv_transfer_per_token=5.2e-6,
        tokenize_per_token=4.4e-6,
    ),
    # Llama-3.1-8B-Instruct, BF16, one A100-40GB, vLLM defaults.
    "llama3-8b-a100": Preset(
        name="llama3-8b-a100",
        description="Llama-3.1-8B BF16 on one A100 40GB (vLLM defaults)",
        a=1.30e-2, b=1.03e-4, c=3.4e-9, e=3.0e-4, f=8.4e-8,
        jitter=0.0,
        num_blocks=9500, block_size=16,
        max_num_seqs=256, max_num_batched_tokens=8192,
        max_model_len=131072,
        kv_transfer_base=1.0e-3, kv_transfer_per_token=1.0e-5,
        tokenize_per_token=4.4e-6,
    ),
    # Small and fast: for tests and for load-testing proxies, not a GPU.
    "tiny": Preset(
        name="tiny",
        description="test preset: ~2 ms steps, small KV cache",
        a=2.0e-3, b=2.0e-6, c=0.0, e=5.0e-5, f=0.0,
        jitter=0.0,
        num_blocks=4096, block_size=16,
        max_num_seqs=128, max_num_batched_tokens=4096,
        max_model_len=65536,
        kv_transfer_base=1.0e-3, kv_transfer_per_token=1.0e-7,
    ),
}

DEFAULT_PRESET = "llama3-8b-h100"


def get_preset(name):
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})"
        ) from None


def step_time(p, prefill_tokens, attn_pairs, num_decodes, decode_kv_tokens):
    """Duration in seconds of one step under preset `p` (no jitter/speedup)."""
    return (p.a + p.b * prefill_tokens + p.c * attn_pairs
            + p.e * num_decodes + p.f * decode_kv_tokens)
