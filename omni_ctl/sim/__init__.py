"""A simulated P/D inference cluster (`omni-ctl sim`).

Each instance speaks vLLM's or SGLang's HTTP protocols for real (OpenAI API,
sequential KV transfer with `kv_transfer_params`, parallel transfer through a
bootstrap port, KV-cache events over ZMQ, Prometheus metrics) while its timing
comes from a step-based batching model (see `engine.py` and docs/simulator.md).

The simulator is a measuring instrument: it must not import the proxy's
scoring library, hashing or JSON code.
"""
