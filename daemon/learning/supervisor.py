"""Supervision of one retraining job: the training process (`python -m daemon.learning.retraining_job job.json`), niced
and in its own session (signals to the daemon's process group do not reach it), its progress events (JSON lines
on stdout), its log (stderr → job.log), its timeout (`[retraining].timeout_s`: killed past it) and cancellation
(daemon shutdown: terminated, then killed)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("anomalyd.retraining")

ProgressCallback = Callable[[dict[str, Any]], None]


class JobTimeout(RuntimeError):
    """The training process ran past its timeout (and was killed)."""


class JobSupervisor:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None
        self.cancelled = threading.Event()

    def run(self, run_dir: Path, spec: dict[str, Any], progress: ProgressCallback | None,
            note: Callable[[str], None]) -> tuple[int, str]:
        """Run the job described by `run_dir/job.json`; (exit status, the job's log). JobTimeout past the timeout;
        (-1, "") when cancelled before it started."""
        if self.cancelled.is_set():
            return -1, ""
        log_path = run_dir / "job.log"
        module = str(spec.get("job_module") or "daemon.learning.retraining_job")  # a head: daemon.learning.head_retraining_job
        command = [sys.executable, "-m", module, str(run_dir / "job.json")]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        deadline = time.monotonic() + self.timeout_s
        note(f"training {spec['version']} ({spec['training']['epochs']} epochs, {spec['model']['image_size']} px, "
             f"device {spec['device']}, nice {spec['nice']})")
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
            timer = threading.Timer(self.timeout_s, self._kill)
            timer.daemon = True
            timer.start()
            try:
                assert self.process.stdout is not None
                for raw in self.process.stdout:
                    event = _parse_event(raw)
                    if event is None:
                        continue
                    if event.get("event") == "epoch":
                        note(f"epoch {event['epoch']}/{event['epochs']}: loss {event['loss']:.4f}")
                    if progress is not None:
                        progress(event)
                rc = self.process.wait()
            finally:
                timer.cancel()
                self.process = None
        job_log = log_path.read_text(encoding="utf-8", errors="replace")
        if time.monotonic() > deadline:
            raise JobTimeout(f"the training process ran past [retraining].timeout_s = {self.timeout_s:g}")
        return rc, job_log

    def cancel(self, timeout: float) -> None:
        """Terminate the process in progress (killed after `timeout`)."""
        self.cancelled.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()

    def _kill(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            log.error("retraining job past its timeout: killing it")
            process.kill()


def _parse_event(raw: bytes) -> dict[str, Any] | None:
    text = raw.decode("utf-8", errors="replace").strip()
    if not text.startswith("{"):
        return None
    with contextlib.suppress(json.JSONDecodeError):
        event = json.loads(text)
        return event if isinstance(event, dict) else None
    return None


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(no output)"
