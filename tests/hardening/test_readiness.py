"""Readiness tells the truth (issue 9, case 4): a dead source, frames failing on a full disk, an artifacts
folder or a database that cannot be written each make /api/health/ready answer 503 naming the cause; /metrics
has the per-source last-inspected time and the dead-letter counter."""

from __future__ import annotations

import shutil
import uuid

import httpx
import pytest
from sqlalchemy import create_engine, text

from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.daemon.test_pipeline import BrightnessDetector, png
from tests.waiting import wait_until

pytestmark = pytest.mark.services


def pg_database(postgres) -> tuple[str, str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, postgres.url.rsplit("/", 1)[0] + f"/{name}"


def start_service(tmp_path, url: str) -> Service:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "config.toml").write_text(f"""
[runtime]
max_batch_size = 4
max_batch_delay_ms = 10
[[sources]]
id = "inbox"
kind = "folder"
uri = "inbox"
line = "line1"
settle_s = 0.05
poll_interval_s = 0.05
retry_s = 0.1
[mqtt]
enabled = false
[database]
url = "{url}"
[storage]
dir = "artifacts"
[api]
bind = "127.0.0.1:0"
""")
    service = Service(load_config(tmp_path / "config.toml", environ={}), detector=BrightnessDetector())
    service.start()
    return service


def ready(service: Service) -> tuple[int, dict]:
    response = httpx.get(f"http://127.0.0.1:{service.http_port}/api/health/ready", timeout=10)
    return response.status_code, response.json()


def test_case4_readiness_names_each_cause(tmp_path, postgres):
    name, url = pg_database(postgres)
    service = start_service(tmp_path, url)
    inbox = tmp_path / "inbox"
    try:
        (inbox / "ok.png").write_bytes(png(100))
        assert wait_until(lambda: service.pipeline.processed == 1)
        assert ready(service)[0] == 200
        metrics = httpx.get(f"http://127.0.0.1:{service.http_port}/metrics", timeout=10).text
        assert 'anomalyd_source_last_inspected_timestamp_seconds{source="inbox"} 1.' in metrics
        assert "anomalyd_frames_dead_lettered_total" in metrics

        # 1. a source whose thread ended
        (source,) = service.sources
        source._stop_event.set()
        assert wait_until(lambda: not source.running)
        code, body = ready(service)
        assert code == 503 and any("source inbox is not running" in c for c in body["details"]["causes"])
        source.start()
        assert wait_until(lambda: ready(service)[0] == 200)

        # 2. every frame failing (a full artifacts disk)
        real_write = service.store.write

        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device")

        service.store.write = full_disk
        for i in range(6):
            (inbox / f"f{i}.png").write_bytes(png(i))
        assert wait_until(lambda: service.pipeline.failed >= 6, 30)
        code, body = ready(service)
        assert code == 503 and any("waiting out a resource fault" in c and "disk full" in c
                                   for c in body["details"]["causes"]), body
        service.store.write = real_write

        # 3. the artifacts folder not writable (gone, a file in its place)
        root = service.store.root
        shutil.rmtree(root)
        root.write_text("not a folder")
        code, body = ready(service)
        assert code == 503 and body["details"]["storage"]["writable"] is False
        assert any("artifacts folder" in c for c in body["details"]["causes"])
        root.unlink()
        root.mkdir()

        # 4. a read-only database
        admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
        admin.dispose()
        service.engine.dispose()  # new connections pick the setting up
        code, body = ready(service)
        assert code == 503 and body["details"]["database"]["writable"] is False
        assert any("database is not writable" in c for c in body["details"]["causes"])
    finally:
        service.stop()
