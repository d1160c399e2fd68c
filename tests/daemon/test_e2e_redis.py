"""Scale-out end to end: frames in a Redis Stream, two `anomalyd run --role worker` processes in one consumer group
writing to one PostgreSQL database, one of them killed with SIGKILL mid-run. Every frame must end with exactly one
`inspections` row and no entry may stay unacknowledged.

The detector is AnomalyCLIP on the tiny random golden CLIP (../shared/golden/anomalyclip) at 112 px: the scores
mean nothing, the plumbing is what is under test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
import sqlalchemy as sa

from adapters.sources.redis_stream import RedisFrameWriter
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.services, pytest.mark.shared, pytest.mark.slow]

N_FRAMES = 30
GROUP = "e2e-workers"


def write_config(path: Path, golden: Path, *, db_url: str, redis_url: str, stream: str, mqtt_port: int) -> Path:
    path.write_text(f"""
[model]
name = "anomalyclip"
backbone = "{golden / 'tiny_clip_openai_fp16.safetensors'}"
backbone_config = "{golden / 'tiny-clip-24L.json'}"
prompts = "{golden / 'prompts_official_format.pth'}"
layers = [24]
image_size = 112

[runtime]
device = "cpu"
max_batch_size = 2
max_batch_delay_ms = 10
queue_size = 4
decode_threads = 1
shutdown_grace_s = 10

[[sources]]
id = "frames"
kind = "redis"
line = "line1"
max_fps = 5            # keeps both workers busy long enough to kill one mid-run
queue_size = 2
claim_idle_ms = 1500
block_ms = 200

[redis]
url = "{redis_url}"
stream = "{stream}"
group = "{GROUP}"

[database]
url = "{db_url}"

[storage]
dir = "{path.parent / 'artifacts'}"
save_frames = false

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
publish_inspections = false

[api]
enabled = false
""")
    return path


def anomalyd(*args: str, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "daemon.cli", *args], cwd=REPO_ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def create_database(postgres, name: str) -> str:
    try:
        return postgres.create_database(name)
    except subprocess.CalledProcessError:
        # tests/services.py looks for `createdb` next to a symlinked initdb (/usr/local/bin); do it in SQL.
        engine = sa.create_engine(postgres.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def pending_by_consumer(client: redis.Redis, stream: str) -> dict[str, int]:
    try:
        info = client.xpending(stream, GROUP)
    except redis.ResponseError:  # NOGROUP: no worker has started reading yet
        return {}
    return {c["name"].decode(): int(c["pending"]) for c in info["consumers"]}


def consumers(client: redis.Redis, stream: str) -> set[str]:
    """The consumers that joined the group (a worker joins with its first read)."""
    try:
        return {c["name"].decode() for c in client.xinfo_consumers(stream, GROUP)}
    except redis.ResponseError:  # no stream or no group yet
        return set()


def test_killed_worker_loses_no_frame_and_duplicates_none(tmp_path, golden_dir, postgres, redis_server, mosquitto):
    db_url = create_database(postgres, f"e2e_{uuid.uuid4().hex[:8]}")
    stream = f"e2e:{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "config.toml", golden_dir, db_url=db_url, redis_url=redis_server.url,
                          stream=stream, mqtt_port=mosquitto.port)
    upgrade = subprocess.run([sys.executable, "-m", "daemon.cli", "db", "upgrade", "--config", str(config)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr  # once, before two workers race to migrate

    rng = np.random.default_rng(0)
    frame_ids = [f"cam1:{i:04d}" for i in range(N_FRAMES)]
    frames = [cv2.imencode(".png", rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))[1].tobytes()
              for _ in frame_ids]

    client = redis.Redis.from_url(redis_server.url)
    engine = sa.create_engine(db_url)

    def inspected() -> int:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM inspections")).scalar_one()

    # Same config file; distinct MQTT client ids (the default one is per host: two workers would take turns).
    victim = anomalyd("run", "--role", "worker", "--config", str(config), log=tmp_path / "victim.log",
                      env={"ANOMALYD_MQTT__CLIENT_ID": f"e2e-victim-{stream}"})
    survivor = anomalyd("run", "--role", "worker", "--config", str(config), log=tmp_path / "survivor.log",
                        env={"ANOMALYD_MQTT__CLIENT_ID": f"e2e-survivor-{stream}"})
    victim_name = f"{socket.gethostname()}-{victim.pid}"
    survivor_name = f"{socket.gethostname()}-{survivor.pid}"
    try:
        # The frames go in once both workers read the stream: one started seconds before the other (a busy CI
        # machine) would otherwise take every frame alone at max_fps before the other could share them.
        deadline = time.monotonic() + 180
        while not {victim_name, survivor_name} <= consumers(client, stream):
            assert victim.poll() is None and survivor.poll() is None, "\n".join(
                f"{name}: {(tmp_path / f'{name}.log').read_text()[-1500:]}" for name in ("victim", "survivor"))
            assert time.monotonic() < deadline, f"workers not both reading: {consumers(client, stream)}"
            time.sleep(0.05)
        writer = RedisFrameWriter(redis_server.url, stream)
        for frame_id, png in zip(frame_ids, frames, strict=True):
            writer.append(png, frame_id=frame_id, source="cam1", line="line1", content_type="image/png")
        writer.close()

        # Kill the victim while both are working and the victim holds unacknowledged entries.
        deadline = time.monotonic() + 180
        while True:
            assert victim.poll() is None and survivor.poll() is None, "\n".join(
                f"{name}: {(tmp_path / f'{name}.log').read_text()[-1500:]}" for name in ("victim", "survivor"))
            pending = pending_by_consumer(client, stream)
            if pending.get(victim_name, 0) > 0 and pending.get(survivor_name, 0) > 0 and inspected() > 0:
                break
            assert time.monotonic() < deadline, f"workers never both busy: {pending}, {inspected()} rows"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        orphaned = [entry["message_id"] for entry in
                    client.xpending_range(stream, GROUP, "-", "+", 100, consumername=victim_name)]
        assert orphaned, "the victim held no entries when killed"
        assert inspected() < N_FRAMES

        deadline = time.monotonic() + 180
        while inspected() < N_FRAMES or client.xpending(stream, GROUP)["pending"] > 0:
            assert survivor.poll() is None, (tmp_path / "survivor.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (f"{inspected()}/{N_FRAMES} rows, "
                                                 f"{client.xpending(stream, GROUP)['pending']} pending")
            time.sleep(0.2)
    finally:
        for proc in (victim, survivor):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (victim, survivor):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    assert survivor.returncode == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT frame_id, count(*) FROM inspections GROUP BY frame_id")).all()
        rejected = conn.execute(sa.text("SELECT count(*) FROM rejected_frames")).scalar_one()
    engine.dispose()
    assert sorted(frame_id for frame_id, _ in rows) == frame_ids
    assert all(count == 1 for _, count in rows)
    assert rejected == 0
    assert client.xpending(stream, GROUP)["pending"] == 0
    # what the victim held was finished by the survivor
    entries = {e[0] for e in client.xrange(stream)}
    assert set(orphaned) <= entries
