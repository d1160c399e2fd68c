"""Real Mosquitto, Redis and PostgreSQL servers for tests, each on a free loopback port in a temporary directory.

Start them through the session fixtures in `tests/conftest.py` (`mosquitto`, `redis_server`, `postgres`), or
directly with the classes here when a test must stop and restart a server (broker outage tests).
Binaries come from Debian packages (`apt-get install mosquitto redis-server postgresql`); `.ci/run` installs them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def find_binary(name: str, extra_globs: tuple[str, ...] = ()) -> str | None:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    for pattern in extra_globs:
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[-1]
    return None


class _Server:
    """A server process with a temp dir; `start`/`stop` may be called repeatedly (same port, same data)."""

    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"anomalyd-{self.name}-"))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "server.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the life of the process
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        try:
            wait_for_port(self.port, proc=self.proc)
        except Exception as exc:
            raise RuntimeError(f"{self.name} failed to start: {exc}\n{self.log_path.read_text()[-2000:]}") from exc

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Mosquitto(_Server):
    name = "mosquitto"

    def command(self) -> list[str]:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.dir}/\nautosave_interval 1\n"
            "max_queued_messages 100000\n"
            # As root, mosquitto drops to the `mosquitto` user, which cannot write the persistence file in our temp
            # dir; subscribers' sessions would then not survive a restart.
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        binary = find_binary("mosquitto")
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        return [binary, "-c", str(conf)]


class Redis(_Server):
    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary = find_binary("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", "--protected-mode", "no"]


class Postgres(_Server):
    """A throwaway cluster; when running as root, the server runs as the `postgres` system user."""

    name = "postgres"

    def __init__(self) -> None:
        super().__init__()
        self.bindir = self._bindir()
        self.data = self.dir / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run([*self.as_user, f"{self.bindir}/initdb", "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)

    @staticmethod
    def _bindir() -> str:
        initdb = find_binary("initdb", ("/usr/lib/postgresql/*/bin/initdb",))
        if initdb is None:
            raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
        return str(Path(initdb).resolve().parent)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def command(self) -> list[str]:
        return [*self.as_user, f"{self.bindir}/postgres", "-D", str(self.data), "-p", str(self.port),
                "-h", "127.0.0.1", "-k", str(self.dir), "-c", "fsync=off", "-c", "full_page_writes=off"]

    def start(self, timeout: float = 60.0) -> None:
        """Returns once the server accepts sessions: it listens on its port while still replaying its WAL, and a
        connection then fails with "the database system is starting up"."""
        super().start()
        deadline = time.monotonic() + timeout
        while True:
            ready = subprocess.run([f"{self.bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(self.port),
                                    "-U", "postgres", "-t", "1"], capture_output=True)
            if ready.returncode == 0:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}\n{self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres on port {self.port} not ready after {timeout}s "
                                   f"({ready.stdout.decode().strip()})")
            time.sleep(0.05)

    def stop(self) -> None:
        """A fast shutdown through pg_ctl (terminating the runuser wrapper would leave postmaster.pid behind)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run([*self.as_user, f"{self.bindir}/pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w"],
                       capture_output=True, timeout=60)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            super().stop()

    def create_database(self, name: str) -> str:
        """A fresh database on this server; returns its SQLAlchemy URL."""
        subprocess.run([*self.as_user, f"{self.bindir}/createdb", "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "postgres", name], check=True, capture_output=True)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"
