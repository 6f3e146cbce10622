"""The scoring library (nginx_modules/scoring) for Python.

The same C code runs inside nginx on the request path.  The package:

- :mod:`.binding`: the Pythonic layer (block hashes, :class:`PrefixIndex`,
  :class:`Predictor`, the policies the module calls); everything it exports
  is importable from ``omni_ctl.scoring`` itself;
- :mod:`.errors`: the exceptions the library's negative codes become;
- :mod:`.jsonscan`: the JSON scanner/splicer (``json_edit``...), also
  re-exported here;
- ``cdefs/*.cdef`` and :mod:`.build`: the cffi builder of the extension
  ``omni_ctl.scoring._scoring`` (``ffi``, ``lib``).

The simulator and the benchmark do not import this package (they are
measuring instruments); ``omni-ctl bench-lib`` (omni_ctl/bench/lib.py),
which measures the library itself, is the one exception.
"""

from .binding import *                          # noqa: F401,F403
from .binding import __all__                    # noqa: F401
