"""Operations: the systemd unit (Type=notify, WatchdogSec; `systemd-analyze verify`), sd_notify from the daemon
(READY=1 once serving, WATCHDOG=1 while healthy, STOPPING=1), Prometheus process/build/model series, and the Grafana
dashboard in docs/ using only series the daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from daemon.api import routers
from daemon.config.settings import load_config
from daemon.process.service import Service
from daemon.telemetry.systemd import SystemdNotifier
from tests.conftest import REPO_ROOT, require
from tests.daemon.test_pipeline import BrightnessDetector
from tests.daemon.test_tokens import write_config

UNIT = REPO_ROOT / "deploy" / "anomalyd.service"
DASHBOARD = REPO_ROOT / "docs" / "grafana-dashboard.json"


def test_systemd_unit_is_notify_with_watchdog_and_verifies(tmp_path):
    text = UNIT.read_text()
    assert re.search(r"^Type=notify$", text, re.M) and re.search(r"^WatchdogSec=\d+", text, re.M)
    assert re.search(r"^ExecStart=/opt/anomalyd/venv/bin/anomalyd run$", text, re.M)
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze is not installed (Debian package systemd)")
    # verify checks that the commands exist: point them at this environment's `anomalyd`
    unit = tmp_path / "anomalyd.service"
    unit.write_text(text.replace("/opt/anomalyd/venv/bin/", f"{Path(sys.executable).parent}/"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "anomalyd.service" not in result.stderr, result.stderr  # no warning about our unit


def test_watchdog_pings_only_while_healthy_and_rate_limited(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify"))
    server.settimeout(1)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "10000000"})
    assert notifier.watchdog_s == 10.0
    assert not notifier.watchdog(healthy=False, now=100.0)
    assert notifier.watchdog(healthy=True, now=100.0)
    assert server.recv(100) == b"WATCHDOG=1"
    assert not notifier.watchdog(healthy=True, now=103.0)  # within half the interval
    assert notifier.watchdog(healthy=True, now=105.5)
    assert not SystemdNotifier({}).ready("x")  # outside systemd: nothing
    server.close()


def exported_series(text: str) -> set[str]:
    series = set()
    for kind_line in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = kind_line
        series.add(name)
        if kind == "counter":
            series |= {name + "_total", name + "_created"}
        elif kind == "histogram":
            series |= {name + "_bucket", name + "_sum", name + "_count", name + "_created"}
    series |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M))
    return series


def test_daemon_notifies_systemd_and_exports_what_the_dashboard_charts(tmp_path, monkeypatch):
    notify_path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(notify_path))
    server.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping at least every 0.5 s: every turn of the 1 s loop
    config = write_config(tmp_path, '[[api.tokens]]\nname = "ops"\nrole = "admin"\ntoken = "s3cret"\n')
    service = Service(load_config(config, environ={}), detector=BrightnessDetector(image_size=32), sources=[],
                      routers=routers())
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()
    try:
        ready = server.recv(1000).decode()
        assert "READY=1" in ready and "STATUS=inspecting 0 source(s)" in ready
        assert server.recv(1000) == b"WATCHDOG=1"
        text = httpx.get(f"http://127.0.0.1:{service.http_port}/metrics", timeout=30).text
    finally:
        service.request_stop()
        runner.join(60)
    messages = []
    while True:
        try:
            messages.append(server.recv(1000).decode())
        except (TimeoutError, OSError):
            break
        if messages[-1].startswith("STOPPING=1"):
            break
    assert messages[-1].startswith("STOPPING=1")
    server.close()

    assert re.search(r'^anomalyd_model_info\{image_size="32",model="fake",version="fake-v1"\} 1\.0$', text, re.M)
    assert re.search(r'^anomalyd_build_info\{python="[\d.]+",version="[^"]+"\} 1\.0$', text, re.M)
    assert re.search(r"^process_resident_memory_bytes \d", text, re.M)

    series = exported_series(text)
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\b((?:anomalyd|process|python)_[a-z0-9_]+)", target["expr"]))
    assert len(used) >= 15
    assert sorted(used - series) == []
