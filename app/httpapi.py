"""The small JSON-over-HTTP layer shared by the server and client control APIs.

A route is a function ``(Request) -> dict`` registered on an ``Api``; it
raises ``HttpError`` for a 4xx with a reason. State-changing routes are
marked ``mutating`` and pass only for a source address in the allowed
networks or with the configured token (``?token=`` or ``X-Hongbao-Token``).
Requests are GETs with query strings; anything with a body larger than
``MAX_BODY`` or a URL longer than ``MAX_URL`` is refused before routing.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from gevent.pywsgi import WSGIHandler, WSGIServer

log = logging.getLogger(__name__)

MAX_URL = 2048
MAX_BODY = 4096
IO_TIMEOUT = 5.0  # seconds a client may take per read/write (requests are tiny)


class HttpError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Request:
    path: str
    query: dict[str, str]
    remote: str
    headers: dict[str, str]

    def int_param(self, name: str, default: int | None = None, minimum: int = 0,
                  maximum: int = 2**32 - 1) -> int:
        """An integer query parameter, or 400 naming the parameter and why."""
        raw = self.query.get(name)
        if raw is None or raw == "":
            if default is None:
                raise HttpError(400, f"missing parameter '{name}'")
            return default
        try:
            value = int(raw)
        except ValueError:
            raise HttpError(400, f"parameter '{name}' must be an integer, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise HttpError(400, f"parameter '{name}' must be in [{minimum}, {maximum}]")
        return value


Handler = Callable[[Request], dict[str, Any]]

STATUS_TEXT = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
               405: "Method Not Allowed", 413: "Payload Too Large", 414: "URI Too Long",
               500: "Internal Server Error", 503: "Service Unavailable"}


class Api:
    """A WSGI application of JSON routes with token/address authorisation."""

    def __init__(self, token: str = "", allow: Iterable[Any] = ()) -> None:
        self.token = token
        self.allow = tuple(ipaddress.ip_network(n) for n in allow)
        self.routes: dict[str, tuple[Handler, bool]] = {}

    def route(self, path: str, mutating: bool = False) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.routes[path] = (fn, mutating)
            return fn

        return register

    def authorised(self, request: Request) -> bool:
        given = request.query.get("token") or request.headers.get("x-hongbao-token", "")
        if self.token and given and hmac.compare_digest(given, self.token):
            return True
        try:
            address = ipaddress.ip_address(request.remote)
        except ValueError:
            return False
        return any(address in net for net in self.allow)

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        try:
            body = self._handle(environ)
            status = 200
        except HttpError as exc:
            status, body = exc.status, {"error": exc.reason}
        except Exception:  # a bug in a route must not kill the server
            log.exception("control API route failed")
            status, body = 500, {"error": "internal error"}
        data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
        start_response(f"{status} {STATUS_TEXT.get(status, '')}",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(data)))])
        return [data]

    def _handle(self, environ: dict[str, Any]) -> dict[str, Any]:
        path = environ.get("PATH_INFO", "")
        raw_query = environ.get("QUERY_STRING", "")
        if len(path) + len(raw_query) > MAX_URL:
            raise HttpError(414, f"URL longer than {MAX_URL} bytes")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
        if length > MAX_BODY:
            raise HttpError(413, f"request body larger than {MAX_BODY} bytes")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            raise HttpError(405, "only GET is served")
        route = self.routes.get(path.rstrip("/") or "/")
        if route is None:
            raise HttpError(404, f"no such path {path!r}; try {sorted(self.routes)}")
        handler, mutating = route
        try:
            parsed = parse_qs(raw_query, keep_blank_values=True, strict_parsing=False,
                              max_num_fields=32)
        except ValueError as exc:
            raise HttpError(400, f"bad query string: {exc}") from None
        query = {k: v[-1] for k, v in parsed.items()}
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        request = Request(path, query, environ.get("REMOTE_ADDR", ""), headers)
        if mutating and not self.authorised(request):
            raise HttpError(403, "state changes need the token or an allowed source address")
        return handler(request)


class BoundedHandler(WSGIHandler):
    """A handler whose socket reads and writes time out.

    gevent's handler has no timeout of its own: a client that sends half a
    request line, or declares a body (e.g. the 413 case) and never sends
    it, held a greenlet and a descriptor forever (gevent drains the body
    after the answer). With the timeout it is cut after ``IO_TIMEOUT``.
    """

    def handle(self) -> None:
        self.socket.settimeout(IO_TIMEOUT)
        super().handle()


def serve(api: Api, address: tuple[str, int]) -> WSGIServer:
    """Start serving ``api`` on ``address`` (port 0 picks one; see ``server.address``)."""
    server = WSGIServer(address, api, log=None, error_log=log, handler_class=BoundedHandler)
    server.start()
    return server


def now() -> float:
    """The clock a /health answer carries (clients derive their offset from it)."""
    return time.time()
