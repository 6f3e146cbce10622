"""Per-instance fault injection (flags and `POST /sim/fault`)."""

MODES = ("none", "error", "slow", "hang", "stall", "drop", "exit", "eos_first",
         "kv_drop")


class FaultError(ValueError):
    pass


class Fault:
    """Current fault of one instance.

    none       normal operation
    error      answer inference requests with an error JSON (HTTP `status`,
               default 500) with probability `rate` (default 1)
    slow       multiply every step time by `factor` (default 10)
    hang       accept inference requests and /health, never answer
    stall      stop a response after `after_tokens` tokens (default 2) and keep
               the connection open without sending anything more
    drop       close the connection without a response, or after
               `after_tokens` streamed tokens when `after_tokens` > 0
    exit       the instance dies: listeners close, KV is lost; revive it with
               {"mode": "none", "instance": NAME} sent to another instance
    eos_first  every new request ends at its first token with finish_reason
               "stop" (EOS), whatever ignore_eos/min_tokens say
    kv_drop    KV-event messages are lost on the wire with probability `rate`
               (their sequence numbers are skipped; replay still has them);
               requests are served normally
    """

    def __init__(self, mode="none", rate=1.0, status=500, factor=10.0,
                 after_tokens=None):
        if mode not in MODES:
            raise FaultError(f"unknown fault mode {mode!r} (known: {', '.join(MODES)})")
        try:
            rate = float(rate)
            status = int(status)
            factor = float(factor)
            if after_tokens is None:
                after_tokens = 2 if mode == "stall" else 0
            after_tokens = int(after_tokens)
        except (TypeError, ValueError) as exc:
            raise FaultError(f"bad fault parameter: {exc}") from None
        if not 0.0 <= rate <= 1.0:
            raise FaultError(f"rate must be within [0, 1], got {rate}")
        if not 400 <= status <= 599:
            raise FaultError(f"status must be an HTTP error status, got {status}")
        if factor <= 0:
            raise FaultError(f"factor must be > 0, got {factor}")
        if after_tokens < 0:
            raise FaultError(f"after_tokens must be >= 0, got {after_tokens}")
        self.mode = mode
        self.rate = rate
        self.status = status
        self.factor = factor
        self.after_tokens = after_tokens

    @classmethod
    def from_dict(cls, d):
        known = {"mode", "rate", "status", "factor", "after_tokens"}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def parse_flag(cls, text):
        """`NAME=MODE[,key=value...]` -> (NAME, Fault)."""
        name, sep, rest = text.partition("=")
        if not sep or not name:
            raise FaultError(f"--fault {text!r}: expected NAME=MODE[,key=value...]")
        parts = rest.split(",")
        kw = {"mode": parts[0]}
        for p in parts[1:]:
            k, sep, v = p.partition("=")
            if not sep:
                raise FaultError(f"--fault {text!r}: {p!r} is not key=value")
            kw[k] = v
        return name, cls.from_dict(kw)

    def as_dict(self):
        return {"mode": self.mode, "rate": self.rate, "status": self.status,
                "factor": self.factor, "after_tokens": self.after_tokens}
