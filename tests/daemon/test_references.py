"""Per-source references in the daemon (tiny CLIP from ../shared, folder sources, SQLite): banks per source with
routing and versions, bad references named while the other sources go on, calibrated thresholds per source and
model version, a rebuild swapped in without dropping frames, the API/CLI reference management and the 0–1 scale.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from adapters.db import Inspection, Label, RejectedFrame, SourceThreshold
from daemon.config.settings import ConfigError, load_config
from daemon.detectors.scale import scaled
from daemon.frames.results import extract_regions, map_to_frame
from tests.daemon.test_api import TOKENS, auth
from tests.model.golden import tiny_backbone
from tests.waiting import wait_until

SIZE = 112


@pytest.fixture(scope="module")
def backbone(golden_dir):
    return tiny_backbone(golden_dir)


def _texture(seed: int, defect: bool = False, size: int = 160) -> np.ndarray:
    """A fixed-camera texture (the same tile every frame, a little noise); a dark blotch when `defect`."""
    tile = cv2.resize(np.random.default_rng(1).integers(0, 256, (6, 6, 3)).astype(np.uint8), (32, 32),
                      interpolation=cv2.INTER_CUBIC)
    image = np.tile(tile, (size // 32 + 1, size // 32 + 1, 1))[:size, :size].astype(np.int16)
    image += np.random.default_rng(seed).integers(-6, 7, image.shape)
    if defect:
        cv2.circle(image, (size // 2, size // 2), size // 6, (20, 240, 20), -1)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def _settings(tmp_path: Path, sources: list[dict], mqtt: dict | None = None, **model):
    tokens = [{"name": role, "role": role, "token": token} for role, token in TOKENS.items()]
    return load_config(None, environ={}, overrides={
        "model": {"name": "clip", "image_size": SIZE, **model},
        "runtime": {"device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 5, "shutdown_grace_s": 10},
        "sources": [{"kind": "folder", "settle_s": 0.02, "poll_interval_s": 0.05, "threshold": 0.5,
                     "uri": str(tmp_path / s["id"]), **s} for s in sources],
        "mqtt": mqtt or {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")}, "api": {"enabled": False, "tokens": tokens},
    })


def test_config_accepts_references_and_still_names_unknown_keys(tmp_path):
    settings = _settings(tmp_path, [{"id": "a", "references": "refs/a"}, {"id": "b", "references_from": "labels"}],
                         references="refs/all", false_reject_rate=0.01)
    assert settings.sources[0].references == "refs/a" and settings.sources[1].references_from == "labels"
    assert settings.model.references == "refs/all"
    with pytest.raises(ConfigError, match="references_form"):
        _settings(tmp_path, [{"id": "a", "references_form": "labels"}])
    with pytest.raises(ConfigError, match="references_from"):
        _settings(tmp_path, [{"id": "a", "references_from": "history"}])


def test_four_tap_anomalyclip_map_no_longer_floods_the_frame(backbone, golden_dir):
    """The paper's taps (6, 12, 18, 24) sum four 0–1 maps: raw, every pixel is above any 0–1 pixel threshold (one
    region, a full mask); on the daemon's scale the map is the taps' mean, in 0–1, and a threshold cuts it."""
    from model import create_detector
    from model.preprocess import decode_image, fast_transform
    from tests.model import golden

    detector = create_detector("anomalyclip", backbone=backbone, prompts=golden_dir / "prompts_official_format.pth",
                               layers=(6, 12, 18, 24), image_size=SIZE, device="cpu")
    names = golden.expected_json(golden_dir)["input_files"]
    images = torch.stack([fast_transform(decode_image(golden_dir / name), SIZE) for name in names])
    raw = detector.predict(images)
    daemon = scaled(detector).predict(images)
    threshold = 0.75
    # Raw: the map leaves the 0–1 range and the whole frame is above a 0–1 pixel threshold.
    assert float(raw.maps.amax()) > 1.0 and float(raw.maps.amin()) > threshold
    torch.testing.assert_close(daemon.maps, raw.maps / 4)
    torch.testing.assert_close(daemon.scores, raw.scores)  # the image score was already a probability
    assert float(daemon.maps.amin()) >= 0.0 and float(daemon.maps.amax()) <= 1.0
    for raw_map, scaled_map in zip(raw.maps.numpy(), daemon.maps.numpy(), strict=True):
        raw_mask, raw_regions = extract_regions(map_to_frame(raw_map, 320, 240), threshold)
        mask, _regions = extract_regions(map_to_frame(scaled_map, 320, 240), threshold)
        assert raw_mask.all() and len(raw_regions) == 1
        assert mask.mean() < 0.5, mask.mean()


def _service(settings, backbone):
    from daemon.process.service import Service
    from model import create_detector

    def factory(_settings):
        return create_detector("clip", backbone=backbone, image_size=SIZE, device="cpu")

    return Service(settings, detector_factory=factory, serve_http=False)


def _rows(service) -> list[Inspection]:
    with service.sessions() as session:
        return list(session.scalars(select(Inspection).order_by(Inspection.id)))


def test_daemon_builds_banks_per_source_rejects_bad_ones_and_swaps_rebuilds(tmp_path, backbone):
    refs = tmp_path / "refs-good"
    for index in range(3):
        _write(refs / f"good{index}.png", _texture(100 + index))
    (tmp_path / "refs-empty").mkdir()
    mixed = tmp_path / "refs-mixed"
    _write(mixed / "a.png", _texture(1))
    _write(mixed / "b.png", cv2.cvtColor(_texture(2, size=96), cv2.COLOR_BGR2GRAY))
    foreign = tmp_path / "other-model.safetensors"  # a bank saved for another backbone
    from safetensors.torch import save_file

    save_file({"layer_0": torch.zeros(4, 8, dtype=torch.float16)}, str(foreign),
              metadata={"format": "anomalyd-reference-bank/1", "backbone": "ViT-B-16", "image_size": "224",
                        "layers": "6,12", "kind": "proj", "n_references": "1", "digest": "x"})
    settings = _settings(tmp_path, [
        {"id": "good", "references": str(refs)},
        {"id": "empty", "references": str(tmp_path / "refs-empty")},
        {"id": "mixed", "references": str(mixed)},
        {"id": "foreign", "references": str(foreign)},
        {"id": "plain"},
    ])
    for source in ("good", "empty", "mixed", "foreign", "plain"):
        (tmp_path / source).mkdir()
    service = _service(settings, backbone)
    service.start()
    try:
        manager = service.references
        assert manager.states["good"].version and "+ref-" in manager.states["good"].version
        assert "refs-empty" in manager.unavailable["empty"] and "holds no images" in manager.unavailable["empty"]
        assert "b.png" in manager.unavailable["mixed"] and "96x96 with 1 channel" in manager.unavailable["mixed"]
        assert "other-model.safetensors" in manager.unavailable["foreign"]
        assert "'ViT-B-16'" in manager.unavailable["foreign"]  # names the bank's backbone and the detector's
        assert "plain" not in manager.unavailable and manager.states["plain"].detector is None
        # Auto-calibration from the three references (leave-one-out), stored for the source and its version.
        with service.sessions() as session:
            calibrated = session.scalars(select(SourceThreshold)).all()
        assert [(row.source, row.model_version) for row in calibrated] == [("good", manager.states["good"].version)]
        assert calibrated[0].n_frames == 3 and "leave-one-out" in calibrated[0].method
        threshold, pixel = calibrated[0].threshold, calibrated[0].pixel_threshold
        for source in ("good", "empty", "mixed", "plain"):
            _write(tmp_path / source / "f0.png", _texture(7))
            _write(tmp_path / source / "f1.png", _texture(8, defect=True))
        assert wait_until(lambda: len(_rows(service)) >= 4, timeout=60)
        # The sources without a usable bank: not ready, with the cause; their frames wait in the inbox.
        ready, details = service.readiness()
        assert not ready and any("refs-empty" in cause for cause in details["causes"])
        assert any("b.png" in cause for cause in details["causes"])
        with service.sessions() as session:
            assert session.scalars(select(RejectedFrame)).all() == []
        assert all((tmp_path / source / name).is_file() for source in ("empty", "mixed")
                   for name in ("f0.png", "f1.png"))
        rows = {(row.source, Path(row.frame_name).name): row for row in _rows(service)}
        good_ok, good_bad = rows[("good", "f0.png")], rows[("good", "f1.png")]
        assert good_ok.model_version == manager.states["good"].version
        assert good_ok.threshold == pytest.approx(threshold)  # the calibrated one, not the configured 0.5
        assert rows[("plain", "f0.png")].model_version == service.references._base.version
        assert rows[("plain", "f0.png")].threshold == 0.5
        assert good_bad.score > good_ok.score and good_bad.is_anomalous and not good_ok.is_anomalous
        # The calibrated pixel threshold cuts the normal frame's map (at most a speck above it).
        assert 0 < pixel < 1 and sum(region["area"] for region in good_ok.regions) < 0.01 * 160 * 160
        # A new reference: the bank is rebuilt and swapped in; frames keep flowing, none lost.
        old_version = manager.states["good"].version
        _write(refs / "good3.png", _texture(103))
        for index in range(6):
            _write(tmp_path / "good" / f"g{index}.png", _texture(20 + index))
            time.sleep(0.05)
        manager.wake()
        assert wait_until(lambda: service.pipeline.detector.version_for("good") != old_version, timeout=60)
        for index in range(6, 9):
            _write(tmp_path / "good" / f"g{index}.png", _texture(20 + index))
        assert wait_until(lambda: sum(row.source == "good" for row in _rows(service)) == 11, timeout=60)
        versions = [row.model_version for row in _rows(service) if Path(row.frame_name).name in ("g6.png", "g7.png", "g8.png")]
        assert set(versions) == {manager.states["good"].version} and "-k4" in versions[0]
    finally:
        service.stop()


def test_references_api_cli_and_labels(tmp_path, backbone, capsys):
    from daemon.api import routers
    from daemon.api.app import create_app
    from daemon.cli import main
    from daemon.references import files as refs

    settings = _settings(tmp_path, [{"id": "cam", "references_from": "labels", "threshold": 0.99},
                                    {"id": "other", "threshold": 0.99}])
    for source in ("cam", "other"):
        (tmp_path / source).mkdir()
    service = _service(settings, backbone)
    service.start()
    try:
        assert service.references.states["cam"].detector is None  # no labels yet: zero-shot meanwhile
        for index in range(4):
            _write(tmp_path / "cam" / f"n{index}.png", _texture(40 + index))
        _write(tmp_path / "cam" / "bad.png", _texture(50, defect=True))
        _write(tmp_path / "other" / "o.png", _texture(51))
        assert wait_until(lambda: len(_rows(service)) == 6, timeout=60)
        rows = {Path(row.frame_name).name: row for row in _rows(service)}
        app = create_app(service.app_state(), routers())
        client = TestClient(app)
        assert client.get("/api/sources/cam/references").status_code == 401
        listed = client.get("/api/sources/cam/references", headers=auth("viewer")).json()
        assert listed["items"] == []
        assert client.post("/api/sources/cam/references", json={"inspection_ids": [rows["n0.png"].id]},
                           headers=auth("viewer")).status_code == 403
        wrong = client.post("/api/sources/cam/references", json={"inspection_ids": [rows["o.png"].id]},
                            headers=auth("operator"))
        assert wrong.status_code == 422 and "other" in wrong.json()["detail"]
        assert client.post("/api/sources/nope/references", json={"inspection_ids": [1]},
                           headers=auth("operator")).status_code == 404
        # The defective frame as a reference: added, with a warning naming it.
        with service.sessions() as session, session.begin():
            session.add(Label(inspection_id=rows["bad.png"].id, label="anomalous"))
        added = client.post("/api/sources/cam/references", json={"inspection_ids": [rows["n0.png"].id,
                                                                                    rows["bad.png"].id]},
                            headers=auth("operator"))
        assert added.status_code == 201, added.text
        body = added.json()
        assert len(body["added"]) == 2 and all(item["name"].startswith("ref-") for item in body["added"])
        assert len(body["warnings"]) == 1 and f"inspection {rows['bad.png'].id}" in body["warnings"][0]
        folder = refs.own_reference_dir(settings, "cam")
        assert sorted(p.name for p in folder.iterdir()) == sorted(item["name"] for item in body["added"])
        bad_name = next(i["name"] for i in body["added"] if i["inspection_id"] == rows["bad.png"].id)
        assert client.delete("/api/sources/cam/references", params={"name": "../config.toml"},
                             headers=auth("operator")).status_code == 422
        removed = client.delete("/api/sources/cam/references", params={"name": bad_name}, headers=auth("operator"))
        assert removed.status_code == 200 and not (folder / bad_name).exists()
        # Labelled normals become references too (references_from = "labels"); the bank follows.
        with service.sessions() as session, session.begin():
            for name in ("n1.png", "n2.png"):
                session.add(Label(inspection_id=rows[name].id, label="normal"))
        service.references.wake()
        assert wait_until(lambda: service.pipeline.detector.version_for("cam").endswith("-k3"), timeout=60)
        assert "cam" not in service.references.unavailable
        # Histogram data: scores, labels and the thresholds of the version the source runs now.
        scores = client.get("/api/sources/cam/scores", headers=auth("viewer")).json()
        assert scores["model_version"] == service.references.states["cam"].version
        assert scores["calibrated"] is True and 0 < scores["pixel_threshold"] <= 1
        assert sorted(item["label"] or "-" for item in scores["items"]) == ["-", "-", "anomalous", "normal", "normal"]
        # The CLI over the same database and folders.
        config = tmp_path / "config.toml"
        config.write_text(f"""
[model]
name = "clip"
image_size = {SIZE}
[[sources]]
id = "cam"
kind = "folder"
uri = "{tmp_path / 'cam'}"
references_from = "labels"
[database]
url = "sqlite:///{tmp_path}/anomalyd.db"
[storage]
dir = "{tmp_path / 'artifacts'}"
""")
        assert main(["references", "list", "--source", "cam", "--config", str(config), "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert len(listed["items"]) == 3 and sum(item["removable"] for item in listed["items"]) == 1
        assert main(["references", "add", "--source", "cam", str(rows["n3.png"].id), "--config", str(config)]) == 0
        assert "added ref-" in capsys.readouterr().out
        name = sorted(p.name for p in folder.iterdir() if p.name.startswith(f"ref-{rows['n3.png'].id}-"))[0]
        assert main(["references", "remove", "--source", "cam", name, "--config", str(config)]) == 0
        assert not (folder / name).exists()
        with pytest.raises(SystemExit) as exc:
            main(["references", "remove", "--source", "cam", "nope.png", "--config", str(config)])
        assert exc.value.code == 2 and "nope.png" in capsys.readouterr().err
    finally:
        service.stop()
    shutil.rmtree(tmp_path / "artifacts", ignore_errors=True)
