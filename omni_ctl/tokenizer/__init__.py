"""The tokenizer service: the model's own tokenizer and chat template, run
beside nginx so a request is tokenized once (docs/tokenizer.md).

    wire     the binary answer format (one source of truth for both sides)
    core     loading, completions/chat tokenization, the multi-turn reuse cache
    server   the pre-forked HTTP/1.1 server on a unix socket
    control  start/stop by pid file, readiness wait (used by `omni-ctl start`)
    cli      `omni-ctl tokenizer`
"""
