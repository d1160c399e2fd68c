"""No secret of a configuration full of them appears on an unauthenticated endpoint or in the daemon's log.

`anomalyd run` (a subprocess, the real CLI) with real PostgreSQL, Mosquitto, Redis and an HTTP receiver; every
credential, token and secret-bearing URL path below is unique, so a leak anywhere is found by a plain search.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.daemon.test_pipeline import png
from tests.services import free_port
from tests.waiting import wait_until
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.services

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "database password": "dbPw0secretX",
    "mqtt password": "mqttPw0secretX",
    "mqtt source password": "srcPw0secretX",
    "redis source password": "redisPw0secretX",
    "rtsp password": "rtspPw0secretX",
    "rtsp query token": "rtspTok0secretX",
    "webhook path": "whPath0secretX",
    "webhook query": "whQuery0secretX",
    "webhook hmac": "whHmac0secretX",
    "api token": "apiTok0secretX",
    "opcua password": "opcPw0secretX",
    "mqtt command secret": "cmdKey0secretX",
}


def config_full_of_secrets(tmp_path: Path, postgres, mosquitto, redis_server, receiver: Receiver) -> Path:
    s = SECRETS
    database = postgres.create_database("secrets").replace("postgres@", f"postgres:{s['database password']}@")
    hook = f"{receiver.url.rstrip('/')}/services/T00/B00/{s['webhook path']}?token={s['webhook query']}"
    (tmp_path / "inbox").mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[[sources]]
id = "inbox"
kind = "folder"
uri = "inbox"
line = "l1"
threshold = 0.5
[[sources]]
id = "cams"
kind = "mqtt"
uri = "mqtt://cam:{s['mqtt source password']}@127.0.0.1:{mosquitto.port}/secret-test/cams/#"
line = "l1"
[[sources]]
id = "stream"
kind = "redis"
uri = "redis://:{s['redis source password']}@127.0.0.1:{redis_server.port}/0"
line = "l1"
[[sources]]
id = "rtsp"
kind = "rtsp"
uri = "rtsp://viewer:{s['rtsp password']}@127.0.0.1:{free_port()}/stream1?token={s['rtsp query token']}"
line = "l1"
[mqtt]
host = "127.0.0.1"
port = {mosquitto.port}
username = "daemon"
password = "{s['mqtt password']}"
prefix = "secret-test"
commands = ["trigger", "activate"]
command_secret = "{s['mqtt command secret']}"
[database]
url = "{database}"
[storage]
dir = "var/artifacts"
[api]
bind = "127.0.0.1:0"
[[api.tokens]]
name = "ops"
token = "{s['api token']}"
role = "admin"
[[webhooks]]
url = "{hook}"
secret = "{s['webhook hmac']}"
allow_private = true
[opcua]
enabled = true
endpoint = "opc.tcp://127.0.0.1:{free_port()}/anomalyd"
[[opcua.users]]
name = "plc"
password = "{s['opcua password']}"
role = "operator"
""")
    return config


def leaks(text: str) -> list[str]:
    return [name for name, secret in SECRETS.items() if secret.lower() in text.lower()]


def test_no_secret_on_open_endpoints_or_in_the_log(tmp_path, postgres, mosquitto, redis_server):
    receiver = Receiver()
    try:
        config = config_full_of_secrets(tmp_path, postgres, mosquitto, redis_server, receiver)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        log_path = tmp_path / "daemon.log"
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "run", "--config", str(config),
                 "--detector-factory", "tests.daemon.test_e2e_folder:fake_detector_factory"],
                cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            def port() -> int | None:
                found = re.search(r"HTTP API on http://127\.0\.0\.1:(\d+)", log_path.read_text())
                return int(found.group(1)) if found else None

            assert wait_until(lambda: port() is not None or process.poll() is not None, 120), log_path.read_text()
            assert process.poll() is None, log_path.read_text()
            base = f"http://127.0.0.1:{port()}"
            # Let every source fail or connect at least once (their errors land in the log and in readiness).
            assert wait_until(lambda: all(name in httpx.get(f"{base}/api/health/ready", timeout=10).text
                                          for name in ("cams", "stream", "rtsp")), 60)
            # An alert the receiver refuses: the webhook's failure is logged (with what the log names it by).
            receiver.status = 500
            (tmp_path / "inbox" / "bright.png").write_bytes(png(250))
            assert wait_until(lambda: "webhook" in log_path.read_text() and "HTTP 500" in log_path.read_text(), 60)
            responses = {}
            for path in ("/api/health/live", "/api/health/ready", "/metrics", "/api/openapi.json", "/docs", "/",
                         "/api/inspections", "/api/models"):
                response = httpx.get(base + path, timeout=10)
                responses[path] = f"{response.status_code} {dict(response.headers)} {response.text}"
            ready = httpx.get(f"{base}/api/health/ready", timeout=10).json()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        receiver.stop()
    for path, text in responses.items():
        assert leaks(text) == [], f"{path} shows {leaks(text)}: {text[:3000]}"
    log_text = log_path.read_text()
    assert leaks(log_text) == [], [line for line in log_text.splitlines() if leaks(line)][:20]
    # What readiness names instead: the webhook by its name and its scheme and host only.
    webhook = next(iter(ready["details"]["webhooks"].values()))
    assert webhook["url"] == receiver.url.split("/", 3)[0] + "//" + receiver.url.split("/", 3)[2]
