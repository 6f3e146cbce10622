"""Exceptions of the scoring library, and the one place its codes become them.

Every negative ``OMNI_E*`` return code maps to one class below.  Each class
also subclasses the builtin a Python caller would naturally catch
(``ValueError`` for bad input, ``MemoryError`` for allocation failures, ...),
so code that does not know about the scoring library still handles them.

Use :func:`check` right after every library call that returns a code::

    check(lib.omni_json_scan(...), "json scan")
"""

from ._scoring import ffi, lib

__all__ = [
    "ScoringError",
    "ScoringMemoryError",
    "InvalidArgumentError",
    "BufferTooSmallError",
    "JSONError",
    "JSONDepthError",
    "JSONTypeError",
    "NotFoundError",
    "CapacityError",
    "IntegrityError",
    "HoldError",
    "error_for",
    "check",
]


class ScoringError(Exception):
    """Base class: a scoring-library call returned a negative code.

    ``code`` is the library's code (``lib.OMNI_E*``), ``detail`` the extra
    text the caller gave (may be empty).
    """

    code = None

    def __init__(self, message, code=None, detail=""):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.detail = detail


class ScoringMemoryError(ScoringError, MemoryError):
    """OMNI_ENOMEM: the allocator returned NULL."""

    code = lib.OMNI_ENOMEM


class InvalidArgumentError(ScoringError, ValueError):
    """OMNI_EINVAL: an argument is out of range or missing."""

    code = lib.OMNI_EINVAL


class BufferTooSmallError(ScoringError, OverflowError):
    """OMNI_ERANGE: an output buffer was too small (the wrappers normally
    retry with the size the library reported, so seeing this is a bug)."""

    code = lib.OMNI_ERANGE


class JSONError(ScoringError, ValueError):
    """OMNI_EJSON: the input is not valid JSON (RFC 8259, UTF-8).

    ``offset`` is the byte offset of the fault when known, else None.
    """

    code = lib.OMNI_EJSON
    offset = None


class JSONDepthError(JSONError):
    """OMNI_EDEPTH: nesting deeper than the configured limit."""

    code = lib.OMNI_EDEPTH


class JSONTypeError(JSONError, TypeError):
    """OMNI_ETYPE: valid JSON, but not the type the operation needs
    (e.g. a top-level array where an object is required)."""

    code = lib.OMNI_ETYPE


class NotFoundError(ScoringError, LookupError):
    """OMNI_ENOTFOUND: key, index or instance not present."""

    code = lib.OMNI_ENOTFOUND


class CapacityError(ScoringError, RuntimeError):
    """OMNI_EFULL: a fixed capacity is exhausted."""

    code = lib.OMNI_EFULL


class IntegrityError(ScoringError, RuntimeError):
    """OMNI_EINTEGRITY: check_integrity() found a broken invariant."""

    code = lib.OMNI_EINTEGRITY


class HoldError(ScoringError, RuntimeError):
    """OMNI_EHOLD: policy answer "no instance can take it now, hold".
    Callers of the policy functions usually test for the code instead."""

    code = lib.OMNI_EHOLD


_BY_CODE = {cls.code: cls for cls in (
    ScoringMemoryError, InvalidArgumentError, BufferTooSmallError, JSONError,
    JSONDepthError, JSONTypeError, NotFoundError, CapacityError,
    IntegrityError, HoldError,
)}


def strerror(code):
    """The library's own text for ``code``."""
    return ffi.string(lib.omni_strerror(code)).decode()


def error_for(code, detail=""):
    """The exception (not raised) for a negative library code.

    The message is ``"<detail>: <library text>"`` (or just the library text).
    Unknown codes give a plain :class:`ScoringError`.
    """
    cls = _BY_CODE.get(code, ScoringError)
    text = strerror(code)
    message = f"{detail}: {text}" if detail else text
    return cls(message, code=code, detail=detail)


def check(code, detail=""):
    """Return ``code`` when it is >= 0, else raise :func:`error_for` it."""
    if code < 0:
        raise error_for(code, detail)
    return code
