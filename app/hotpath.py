"""Compiled hot path or pure Python: one switch for every process of a run.

The SET's and the client worker's commonest traffic (a lone SHAKE in, a lone
SHAKE_RESULT out) has two implementations with one meaning: a small C
extension built by ``pip install`` when a compiler is present
(``app.server._fastset``, ``app.client._fastclient``) and the pure-Python
reference next to each (``app.server.fastpath``, ``app.client.fastpath``),
which tests run against the C one on the same input. Without a compiler
the package still installs and runs the reference.

``HONGBAO_PURE_PYTHON=1`` in the environment forces the reference in every
process started from it (the benches compare the two this way).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

PURE_ENV = "HONGBAO_PURE_PYTHON"


def forced_pure() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def compiled(module: str) -> ModuleType | None:
    """The compiled module ``module``, or None (not built, or the pure path forced)."""
    if forced_pure():
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def describe() -> str:
    """Which hot path processes started now would run, for run headers and results."""
    if forced_pure():
        return f"pure Python ({PURE_ENV}=1)"
    missing = [name for name in ("app.server._fastset", "app.client._fastclient")
               if compiled(name) is None]
    if missing:
        return f"pure Python ({', '.join(missing)} not built: pip install -e . needs a C compiler)"
    return "compiled (app.server._fastset, app.client._fastclient)"
