"""scripts/setup.sh --test installs what the tests and the docs use, the broker's command-line clients included
(`mosquitto_pub`/`mosquitto_sub`). Run with stand-ins for dpkg and apt-get that record what they are asked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_setup_test_installs_the_broker_clients(tmp_path):
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg").write_text("#!/bin/sh\nexit 1\n")  # nothing is installed yet
    # Records each request; the test services' install "fails" so that the script stops there, before it builds a
    # virtual environment.
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncase "$*" in *redis-server*) exit 3;; esac\n')
    (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(tmp_path / "venv")}
    result = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "--test"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0  # stopped at the stand-in's failed install
    installs = [line.split() for line in calls.read_text().splitlines() if line.startswith("install")]
    requested = {word for line in installs for word in line if not word.startswith("-") and word != "install"}
    assert {"mosquitto", "mosquitto-clients", "redis-server", "postgresql"} <= requested, installs
