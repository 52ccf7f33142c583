"""A throwaway TLS server for tests: accepts on 127.0.0.1 in a thread, one connection at a time."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading


class LocalServer:
    """Subclasses set up their TLS context, then call ``start``; ``handle`` serves one connection.

    An error in ``handle`` (one of ``errors``) ends only that connection, as a real server would.
    """

    errors: tuple[type[BaseException], ...] = (ssl.SSLError, OSError)

    def start(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def handle(self, raw: socket.socket) -> None:
        raise NotImplementedError

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # the listening socket was closed
            while True:
                raw, _ = self.sock.accept()
                with contextlib.suppress(*self.errors), raw:
                    self.handle(raw)

    def close(self) -> None:
        self.sock.close()
