"""moto's S3-compatible server on a listening socket the test made: ``python moto_on_socket.py
FD PORT`` serves on the inherited descriptor FD, bound to 127.0.0.1:PORT by the test.

The OS picked the port and the socket never left the test's hands, so no other process can take
the port between choosing and serving (``python -m moto.server -p PORT`` needs a port that is
free at the moment it binds, which a test can only guess). Otherwise as ``moto.server.main``.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    fd, port = int(sys.argv[1]), int(sys.argv[2])
    os.environ.setdefault("MOTO_PORT", str(port))  # as moto.server's main: URLs it builds

    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    app.debug = True
    server = make_server("127.0.0.1", port, app, threaded=True,
                         request_handler=MotoRequestHandler, fd=fd)
    print(f"moto: serving S3 on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
