"""bench/bench_gpu.py's CPU-sized run, so the GPU script cannot rot between GPU machines: every path and mode it
times on a GPU (AnomalyCLIP, AdaCLIP, PatchCore's full bank, each with its naive batch-1 baseline) runs here at
tiny sizes and lands in the Markdown table with a figure; without CUDA the full run stops with a message."""

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
    measured = {(r["model"], r["path"], r["dtype"], r["mode"].split(" (")[0].split(",")[0], r["batch"])
                for r in rows if r.get("images_per_s")}
    clip = "anomalyclip@56"
    expected = {(clip, "naive", "float32", "eager", 1)}
    expected |= {(clip, "ours", d, "eager", b) for d in ("float32", "bfloat16") for b in (1, 2)}
    expected |= {(clip, "ours", "float32", "torch.compile", b) for b in (1, 2)}
    expected |= {(clip, "ours", "float32", "onnxruntime", b) for b in (1, 2)}
    expected |= {("adaclip@56", "naive", "float32", "eager", 1)}
    expected |= {("adaclip@56", "ours", d, "eager", b) for d in ("float32", "bfloat16") for b in (1, 2)}
    expected |= {("patchcore@64", "naive", "float32", "eager", 1)}
    expected |= {("patchcore@64", "ours", "float32", "eager", b) for b in (1, 2)}
    assert expected <= measured, sorted(expected - measured)
    text = table.read_text()
    assert "| model | path | dtype | mode | batch | images/s | × naive | peak memory (MiB) |" in text
    assert text.count(f"\n| {clip} | ours |") == len([e for e in expected if e[:2] == (clip, "ours")])
    assert "| patchcore@64 | ours | float32 | tiles |" in text and "\n| pipeline |" in text


def test_without_cuda_it_stops_with_a_message(tmp_path):
    """The full-size run never falls back to hours on the CPU: no CUDA, a clear message and a failing status."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--output", str(tmp_path / "gpu.md")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "no CUDA device here" in result.stderr and "--cpu-smoke" in result.stderr
    assert not (tmp_path / "gpu.md").exists()
