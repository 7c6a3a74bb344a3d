"""The wire protocol, sans-IO: ``codec`` (frames <-> bytes) and ``session`` (a connection's rules).

``from app import protocol as p`` gives the codec's names (``p.Command``,
``p.encode``, ``p.Decoder`` ...).
"""

from app.protocol.codec import *  # noqa: F403
from app.protocol.codec import __all__  # noqa: F401
from app.protocol.session import (  # noqa: F401
    ClaimAsked,
    ClaimRefused,
    ClientSession,
    LoggedIn,
    Phase,
    ServerSession,
    ShakeAsked,
    ShakeRefused,
)
