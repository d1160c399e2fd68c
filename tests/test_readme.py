"""The README's command-line examples that run offline (marked `<!-- readme-test: offline -->`) run as written,
from a copy of the repository's shipped config, with `anomalyd` being this checkout's command line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

MARKER = "<!-- readme-test: offline -->"


def offline_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(re.escape(MARKER) + r"\s*```sh\n(.*?)```", text, flags=re.DOTALL)


def test_readme_marks_offline_examples():
    blocks = offline_blocks()
    assert blocks
    assert any("anomalyd tokens create" in block and "anomalyd config check" in block for block in blocks)


@pytest.mark.parametrize("index", range(len(offline_blocks())))
def test_readme_offline_example_runs(index, tmp_path, shared_dir):
    block = offline_blocks()[index]
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "config.toml", repo / "config.toml")
    (tmp_path / "shared").symlink_to(shared_dir)
    script = (f'anomalyd() {{ "{sys.executable}" -m daemon.cli "$@"; }}\n'
              f"set -euo pipefail\nset -x\n{block}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANOMALYD_")}
    env.update(PYTHONPATH=str(REPO_ROOT), ANOMALYD_CACHE=str(tmp_path / "cache"), NO_PROXY="*")
    result = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README example failed:\n{result.stderr[-4000:]}\n{result.stdout[-2000:]}"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.part"))  # nothing fetched
