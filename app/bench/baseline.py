"""The baseline the server benchmark compares against: a plain gevent StreamServer.

One greenlet per connection, the textbook gevent way: it answers LOGIN
and SHAKE (always "none left") with the same codec as the real server, so
the difference in bytes and CPU per connection is the architecture's, not
the protocol's. Prints ``listening port=<p>`` when ready.
"""

from __future__ import annotations

import argparse
import sys
import time

from gevent.server import StreamServer

from app import protocol as p

_LOGIN_RESULT = p.LAYOUTS[p.Command.LOGIN_RESULT]
_SHAKE_RESULT = p.LAYOUTS[p.Command.SHAKE_RESULT]


def handle(sock, _address) -> None:
    decoder = p.Decoder()
    userid = 0
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return
            out = []
            second = int(time.time())
            for frame in decoder.feed(data):
                if frame.command == p.Command.LOGIN:
                    userid = frame.userid
                    out.append(_LOGIN_RESULT.pack(20, 1, second, userid, 0))
                elif frame.command == p.Command.SHAKE:
                    out.append(_SHAKE_RESULT.pack(28, 3, second, userid, 15, 0, 0))
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
