"""Day one as a newcomer, scripted (issue 10's "Done when"): a fresh copy of the repository, `make demo`'s command
(the shipped config.toml on the tiny test CLIP from ../shared), images dropped into the inbox, the UI/API entered
with the token the first start printed, the history queried with the CLI from another folder, and `eval` on a
KolektorSDD-layout folder built from the shared samples."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.services import free_port

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def fresh_copy(target: Path) -> Path:
    """The repository's files as a clone has them (tracked and not ignored), nothing built or generated."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def demo_environment(repo: Path, target: str = "demo") -> dict[str, str]:
    """The ANOMALYD_* assignments of a Makefile recipe (`make demo`), with $(CURDIR) = the copy."""
    makefile = (repo / "Makefile").read_text()
    recipe = makefile.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
    assignments = re.findall(r"""(ANOMALYD_[A-Z_]+)=('[^']*'|"[^"]*"|\S+)""", recipe)
    assert any(name.startswith("ANOMALYD_MODEL__") for name, _ in assignments), recipe
    samples = re.search(r"^DEMO_SAMPLES \?= (\S+)$", makefile, re.M)
    env = {}
    for name, value in assignments:
        value = value.strip("'\"")
        if samples:
            value = value.replace("$(DEMO_SAMPLES)", samples.group(1))
        env[name] = value.replace("$(CURDIR)", str(repo))
    return env


def anomalyd(repo: Path, *argv: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def kolektor_from_samples(samples_dir: Path, root: Path) -> Path:
    """KolektorSDD's layout (kosNN/PartN.jpg + PartN_label.bmp) from the shared bottle images, at 128 px."""
    category = samples_dir / "bottle"
    good = sorted((category / "test" / "good").glob("*.png"))[:4]
    defects = sorted((category / "test" / "broken_large").glob("*.png")) + \
        sorted((category / "test" / "contamination").glob("*.png"))[:2]
    parts = [(path, None) for path in good] + [
        (path, category / "ground_truth" / path.parent.name / f"{path.stem}_mask.png") for path in defects]
    for index, (image_path, mask_path) in enumerate(parts):
        folder = root / f"kos{index // 3:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        image = cv2.resize(cv2.imread(str(image_path)), (128, 128), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"Part{index % 3}.jpg"), image)
        if mask_path is None:
            label = np.zeros((128, 128), np.uint8)
        else:
            label = cv2.resize(cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE), (128, 128),
                               interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(folder / f"Part{index % 3}_label.bmp"), label)
    return root


def test_newcomer_day_one(tmp_path, shared_dir, samples_dir):
    repo = fresh_copy(tmp_path / "anomalyd")
    (tmp_path / "shared").symlink_to(shared_dir)  # `../shared` from the copy, as beside a clone
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ANOMALYD_")}
    base_env.update(PYTHONPATH=str(repo), ANOMALYD_CACHE=str(tmp_path / "cache"))
    # `make demo`, on a free port and with an unreachable broker (alerts wait in the outbox, as documented)
    env = {**base_env, **demo_environment(repo), "ANOMALYD_API__BIND": "127.0.0.1:0",
           "ANOMALYD_MQTT__PORT": str(free_port())}
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log_file:
        daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", "config.toml"],
                                  cwd=repo, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        log = ""
        while "anomalyd running" not in log:
            assert daemon.poll() is None and time.monotonic() < deadline, log
            time.sleep(0.5)
            log = log_path.read_text()
        port = int(re.search(r"HTTP API on http://127\.0\.0\.1:(\d+)", log).group(1))
        token = re.search(r"shown this once.*?\n\n\s+(\S+)\n", log, re.S).group(1)
        assert f"Log in to the UI at http://127.0.0.1:{port}/" in log
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {token}"}
        assert "anomalyd tokens create" in httpx.get(f"{base}/", timeout=30).text  # the login says where tokens come from
        assert httpx.get(f"{base}/api/inspections", timeout=30).status_code == 401

        inbox = repo / "var" / "inbox"
        dropped = [*sorted((samples_dir / "bottle" / "test" / "good").glob("*.png"))[:2],
                   *sorted((samples_dir / "bottle" / "test" / "broken_large").glob("*.png"))]
        for path in dropped:
            shutil.copy(path, inbox / f"{path.parent.name}_{path.name}")
        items = []
        while len(items) < len(dropped):
            assert daemon.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
            items = httpx.get(f"{base}/api/inspections", headers=headers, timeout=30).json()["items"]
        assert all(item["score"] is not None for item in items)
        # each row keeps the file's final name: where the folder source moved it after processing
        assert all("/var/inbox/processed/" in item["frame_name"] for item in items)
        assert all(Path(item["frame_name"]).is_file() for item in items)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, log_path.read_text()[-3000:]

    # the CLI from another folder: found through $ANOMALYD_CONFIG or --config; nowhere else a database appears
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = anomalyd(repo, "defects", "--all", "--json", cwd=elsewhere,
                      env={**base_env, "ANOMALYD_CONFIG": str(repo / "config.toml")})
    assert result.returncode == 0, result.stderr
    assert sorted(item["id"] for item in json.loads(result.stdout)) == sorted(item["id"] for item in items)
    assert "alembic" not in result.stderr.lower()
    result = anomalyd(repo, "tokens", "list", "--config", str(repo / "config.toml"), cwd=elsewhere, env=base_env)
    assert result.returncode == 0 and "admin" in result.stdout and token not in result.stdout
    result = anomalyd(repo, "defects", cwd=elsewhere, env=base_env)
    assert result.returncode == 1 and "no database at" in result.stderr
    assert list(elsewhere.iterdir()) == []

    # eval on a KolektorSDD-layout folder: parts labelled by their masks, real metrics, exit 0
    kolektor = kolektor_from_samples(samples_dir, tmp_path / "KolektorSDD")
    golden = shared_dir / "golden" / "anomalyclip"
    result = anomalyd(repo, "eval", "--data", str(kolektor), "--json", "--image-size", "112",
                      "--backbone", str(golden / "tiny_clip_openai_fp16.safetensors"),
                      "--backbone-config", str(golden / "tiny-clip-24L.json"),
                      "--prompts", str(golden / "prompts_official_format.pth"), cwd=elsewhere, env=base_env)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)["anomalyclip"]["mean"]
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert "KolektorSDD" in json.loads(result.stdout)["anomalyclip"]["per_category"]
