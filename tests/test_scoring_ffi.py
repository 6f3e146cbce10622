"""Raw cffi smoke test: the compiled library answers through ffi/lib alone,
without the Pythonic layer (so a binding bug cannot hide a library bug)."""

from omni_ctl.scoring._scoring import ffi, lib


def test_error_strings_and_version():
    codes = [lib.OMNI_OK, lib.OMNI_ENOMEM, lib.OMNI_EINVAL, lib.OMNI_ERANGE,
             lib.OMNI_ENOTFOUND, lib.OMNI_EFULL, lib.OMNI_EINTEGRITY,
             lib.OMNI_EHOLD]
    texts = {ffi.string(lib.omni_strerror(c)) for c in codes}
    assert len(texts) == len(codes)
    assert ffi.string(lib.omni_strerror(-999)) == b"unknown error"
    assert ffi.string(lib.omni_version()).count(b".") == 2


def test_hash_index_predict_policy_round_trip():
    toks = ffi.new("uint32_t[]", list(range(64)))
    hashes = ffi.new("uint64_t[]", 4)
    assert lib.omni_hash_blocks(toks, 64, 16, 0, hashes, 4) == 4
    assert lib.omni_hash_blocks(toks, 64, 0, 0, hashes, 4) == lib.OMNI_EINVAL
    assert lib.omni_hash_blocks(toks, 64, 16, 0, hashes, 2) == 2   # short cap

    cfg = ffi.new("omni_index_cfg_t *", {"max_instances": 3, "block_size": 16,
                                          "instance_capacity": 10})
    rc = ffi.new("int *")
    alloc = lib.omni_malloc_allocator()
    idx = lib.omni_index_new(cfg, alloc, rc)
    assert rc[0] == lib.OMNI_OK and idx != ffi.NULL
    try:
        assert lib.omni_index_insert(idx, 2, hashes, 4, 0) == 4
        out = ffi.new("uint32_t[]", 3)
        assert lib.omni_index_match_prefix(idx, hashes, 4, 0, out, 3) == 4
        assert list(out) == [0, 0, 4]
        assert lib.omni_index_match_prefix_tokens(idx, toks, 64, 0, out, 3) == 4
        assert lib.omni_index_check_integrity(idx) == lib.OMNI_OK
        st = ffi.new("omni_index_stats_t *")
        lib.omni_index_stats(idx, st)
        assert st.entries == 4 and st.bytes == lib.omni_index_size(cfg)
    finally:
        lib.omni_index_free(idx, alloc)

    bad = ffi.new("omni_index_cfg_t *", {"max_instances": 0})
    assert lib.omni_index_size(bad) == 0
    assert lib.omni_index_new(bad, alloc, rc) == ffi.NULL
    assert rc[0] == lib.OMNI_EINVAL

    pcfg = ffi.new("omni_predict_cfg_t *", {"max_instances": 2})
    p = lib.omni_predict_new(pcfg, alloc, rc)
    assert rc[0] == lib.OMNI_OK
    try:
        assert lib.omni_predict_prefill_us(p, 0, 1024, 0) > 0
        assert lib.omni_predict_prefill_us(p, 2, 1024, 0) == lib.OMNI_EINVAL
        cands = ffi.new("omni_prefill_cand_t[]", 2)
        cands[1].inst = 1
        blocks = ffi.new("uint32_t[]", [0, 0])
        assert lib.omni_policy_prefill_prepare(p, blocks, 2, 16, 64, 0, cands,
                                               2) == lib.OMNI_OK
        dec = ffi.new("omni_decision_t *")
        assert lib.omni_policy_prefill_choose(cands, 2, 64, 2**64 - 1,
                                              dec) == lib.OMNI_OK
        assert dec.choice == 0
        cands[0].max_running = cands[1].max_running = 1
        cands[0].running = cands[1].running = 1
        assert lib.omni_policy_prefill_choose(cands, 2, 64, 0,
                                              dec) == lib.OMNI_EHOLD
    finally:
        lib.omni_predict_free(p, alloc)
