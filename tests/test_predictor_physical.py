"""The predictor stays physical: every term of the prefill and decode
models is a cost, so a few samples that cannot tell the terms apart must
never leave a negative coefficient that makes long prompts look free.

Found by the scheduler's affinity test: after two prefills (2,064 and 16
new tokens) the quadratic attention term had gone negative, a 16,000-token
prefill in flight was predicted as already finished, and the proxy sent a
cache hit to an instance that was busy for most of a second.
"""

from hypothesis import given, settings, strategies as st

from omni_ctl.scoring import Predictor


def test_two_short_samples_do_not_make_long_prompts_free():
    p = Predictor(2)
    # a long prefill and a tiny one, at about 40 us per token
    p.observe_prefill(0, 2064, 0, 2064 * 40)
    p.observe_prefill(0, 16, 2048, 2_000)
    state = p.state(0)
    assert all(c >= 0 for c in state["prefill_coef"]), state
    # a 16,000-token prefill is predicted to take a while, not nothing
    assert p.prefill_us(0, 16000, 0) > 16000 * 10
    job = p.dispatch_prefill(0, 16000, 0, now_us=1_000_000)
    assert p.wait_us(0, 1_000_000 + 50_000) > 100_000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60000), st.integers(0, 60000),
                          st.integers(1, 5_000_000)), min_size=1, max_size=40),
       st.lists(st.tuples(st.integers(1, 512), st.integers(0, 1 << 22),
                          st.integers(1, 200_000)), max_size=40))
def test_coefficients_never_go_negative(prefills, steps):
    p = Predictor(1)
    for n_new, n_cached, us in prefills:
        p.observe_prefill(0, n_new, n_cached, us)
    for batch, kv, us in steps:
        p.observe_decode(0, batch, kv, us)
    state = p.state(0)
    assert all(c >= 0 for c in state["prefill_coef"]), state
    assert all(c >= 0 for c in state["decode_coef"]), state
    # and so a prediction never shrinks when the work grows
    assert p.prefill_us(0, 20000, 0) >= p.prefill_us(0, 200, 0)
