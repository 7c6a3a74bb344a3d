"""The baseline the server benchmark compares against: a plain gevent StreamServer.

One greenlet per connection, the textbook gevent way: it answers LOGIN
and SHAKE (always "none left") through the same protocol session as the
real server, so the difference in bytes and CPU per connection is the
architecture's, not the protocol's. Prints ``listening port=<p>`` when ready.
"""

from __future__ import annotations

import argparse
import sys
import time

from gevent.server import StreamServer

from app import protocol as p

_SHAKES = (p.ShakeAsked, p.ShakeRefused)


def handle(sock, _address) -> None:
    session = p.ServerSession()
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return
            out = []
            second = int(time.time())
            events = list(session.receive(data))
            if events and type(events[-1]) is p.LoggedIn:  # it stops after the LOGIN
                out.append(session.login_result(p.LoginCode.OK, second))
                events += session.receive(b"")
            for event in events:
                if type(event) in _SHAKES:
                    out.append(session.shake_result(p.ShakeCode.NONE_LEFT, 0, 0, second))
            if out:
                sock.sendall(b"".join(out))
    except (p.ProtocolError, OSError):
        return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = StreamServer(("127.0.0.1", args.port), handle, backlog=4096)
    server.init_socket()
    print(f"listening port={server.address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
