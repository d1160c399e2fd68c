"""systemd integration without a dependency: `sd_notify` over the `$NOTIFY_SOCKET` datagram socket.

With `Type=notify` the unit (deploy/anomalyd.service) is "started" only once the daemon says READY=1, after the
model is loaded and the API listens. With `WatchdogSec=`, systemd sets `$WATCHDOG_USEC` and restarts the daemon when
it stops sending WATCHDOG=1; the daemon sends it from its main loop only while the pipeline is healthy (its threads
alive), so a hung main loop or a dead worker thread gets the service restarted. Outside systemd (no
`$NOTIFY_SOCKET`) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("anomalyd.systemd")


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        if self.address and self.address.startswith("@"):  # abstract namespace socket
            self.address = "\0" + self.address[1:]
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_s = int(watchdog_usec) / 1e6
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> bool:
        """Send one sd_notify message ("READY=1", "STATUS=...", ...); False when not under systemd or it failed."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), exc)
            return False

    def ready(self, status: str) -> bool:
        return self.notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1\nSTATUS=stopping")

    def watchdog(self, healthy: bool, now: float | None = None) -> bool:
        """WATCHDOG=1 at most every half watchdog interval, and only while healthy."""
        if self.watchdog_s is None or not healthy:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.watchdog_s / 2:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")
