"""The HTTP API's server: uvicorn in a thread on a socket bound here, so that port 0 gives a free port known before
serving and the service, not uvicorn, owns the signals. What it serves is daemon/api/app.py's FastAPI app."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

log = logging.getLogger("anomalyd.service")

START_TIMEOUT_S = 10.0


class ApiServer:
    """uvicorn in a thread on a socket we bind ourselves (port 0 → any free port, known before serving)."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # the service owns the signals
        self.thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self.crashed: BaseException | None = None

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:
            self.crashed = exc
            log.exception("HTTP server crashed")

    def start(self) -> None:
        """Serve, returning once uvicorn has started (or died, or START_TIMEOUT_S passed)."""
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
