"""[model] options of PatchCore in the daemon: the bank size and the reference augmentation reach each source's
detector, are part of its version, and the leave-one-out calibration scores against a bank built the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from daemon.config.model_options import reference_model_options
from daemon.config.settings import load_config
from daemon.references.bank import default_builder
from daemon.references.manager import NeedsReferences


def _references(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    files = []
    for index in range(count):
        image = np.full((64, 64, 3), 120, np.uint8)
        image[16:48, 20 + index:44 + index] = 200  # a bright part, placed slightly differently each time
        image = np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
        files.append(folder / f"good_{index}.png")
        Image.fromarray(image).save(files[-1])
    return files


def _settings(tmp_path: Path, **model: object):
    return load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "image_size": 64, **model}, "runtime": {"device": "cpu"},
        "database": {"url": f"sqlite:///{tmp_path}/a.db"}, "mqtt": {"enabled": False}})


def test_bank_options_reach_the_source_detector_and_its_calibration(tmp_path):
    files = _references(tmp_path / "refs")
    base = NeedsReferences("patchcore", "patchcore-efficientnet-lite0-s64", 64)  # what the daemon's base is
    plain = default_builder(_settings(tmp_path), base, files, tmp_path / "plain.safetensors")
    settings = _settings(tmp_path, augment="rotate", max_bank_rows=500)
    assert reference_model_options(settings) == {"image_size": 64, "max_bank_rows": 500, "augment": "rotate"}
    rotated = default_builder(settings, base, files, tmp_path / "rotated.safetensors")
    assert rotated.augment == "rotate" and rotated.bank.rows.shape[0] == 500
    assert rotated.version.endswith("-rotate-m500") and rotated.version.startswith(plain.version)
    # leave-one-out against the others' turned copies as well: never farther, here nearer
    scores = rotated.known_good.own
    assert all(a <= b + 1e-4 for a, b in zip(scores, plain.known_good.own, strict=True))
    assert sum(scores) < sum(plain.known_good.own)
