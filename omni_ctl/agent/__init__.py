"""`omni-ctl agent`: hears the engines (KV events, /metrics, /health) and
pushes what it heard to the proxy in the batch format of :mod:`.batch`."""
