"""bench/bench_gpu.py's CPU-sized run, so the GPU script cannot rot between GPU machines: every path and mode it
times on a GPU runs here on the tiny CLIP and lands in the Markdown table with a figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.shared


def test_cpu_smoke_run_writes_the_table(golden_dir, tmp_path):
    table, figures = tmp_path / "gpu.md", tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--cpu-smoke", "--output", str(table),
         "--json", str(figures)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(figures.read_text())["rows"]
    measured = {(r["path"], r["dtype"], r["mode"].split(" (")[0], r["batch"]) for r in rows if r.get("images_per_s")}
    expected = {("naive", "float32", "eager", 1)}
    expected |= {("ours", d, "eager", b) for d in ("float32", "bfloat16") for b in (1, 2)}
    expected |= {("ours", "float32", "torch.compile", b) for b in (1, 2)}
    expected |= {("ours", "float32", "onnxruntime", b) for b in (1, 2)}
    assert expected <= measured, sorted(measured)
    text = table.read_text()
    assert "| path | dtype | mode | batch | images/s | × naive | peak memory (MiB) |" in text
    assert text.count("\n| ours |") == len(expected) - 1
