"""Dataset handling through the command line: one-class data is an error (exit 1) before any model is built,
`predict` skips the masks of known layouts and colours overlays on the daemon's fixed scale, and label masks may be
PNG, BMP or TIFF of the frame's size."""

from __future__ import annotations

from datetime import datetime, timezone

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from adapters.db import Inspection, Label, make_engine, make_session_factory
from daemon.cli import main
from tests.daemon.test_operator_commands import create_database, write_config
from tests.model import golden
from tests.model.test_dataset_layouts import kolektor


def tiny(golden_dir):
    weights, config = golden.backbone_files(golden_dir)
    return ["--backbone", str(weights), "--backbone-config", str(config), "--image-size", "112",
            "--prompts", str(golden_dir / "prompts_official_format.pth")]


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_and_train_refuse_one_class_data(tmp_path, capsys, monkeypatch):
    import model

    monkeypatch.setattr(model, "create_detector", lambda *a, **k: pytest.fail("no model should be built"))
    only_defects = kolektor(tmp_path / "kolektor", parts=(True, True))
    code, _, err = run(capsys, "eval", "--data", str(only_defects), "--model", "clip")
    assert code == 1 and "found 0 normal and 4 anomalous" in err and "evaluation" in err
    code, _, err = run(capsys, "train", "--data", str(only_defects), "--output", str(tmp_path / "p.safetensors"))
    assert code == 1 and "training needs normal" in err

    unknown = tmp_path / "odd"
    (unknown / "a" / "b").mkdir(parents=True)
    code, _, err = run(capsys, "eval", "--data", str(unknown))
    assert code == 1 and "no images found" in err and "KolektorSDD" in err


def test_predict_skips_masks_and_uses_the_fixed_colour_scale(golden_dir, tmp_path, capsys, monkeypatch):
    from adapters import report

    scales = []
    real = report.write_overlay

    def spy(path, rgb, amap, mask=None, **kwargs):
        scales.append((kwargs.get("vmin"), kwargs.get("vmax")))
        return real(path, rgb, amap, mask, **kwargs)

    monkeypatch.setattr(report, "write_overlay", spy)
    root = kolektor(tmp_path / "kolektor", folders=1)
    out = tmp_path / "out.npz"
    code, _, err = run(capsys, "predict", *tiny(golden_dir), "--output", str(out), "--overlays",
                            str(tmp_path / "ov"), str(root))
    assert code == 0, err
    paths = [str(p) for p in np.load(out)["paths"]]
    assert [p.rsplit("/", 1)[1] for p in paths] == ["Part0.jpg", "Part1.jpg", "Part2.jpg"]
    assert scales == [(0.0, 1.0)] * 3
    scales.clear()
    code, _, _ = run(capsys, "predict", *tiny(golden_dir), "--output", str(out), "--overlays",
                     str(tmp_path / "ov2"), "--overlay-scale", "per-image", str(root / "kos00" / "Part0.jpg"))
    assert code == 0 and scales == [(None, None)]


@pytest.mark.parametrize("suffix", [".bmp", ".tiff", ".png"])
def test_label_masks_png_bmp_tiff_of_the_frames_size(tmp_path, capsys, suffix):
    config = write_config(tmp_path / "plant")
    create_database(config, capsys)
    engine = make_engine(f"sqlite:///{config.parent / 'var' / 'ops.db'}")
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        row = Inspection(frame_id="f1", source="cam", line="l", model_version="v", score=0.9, threshold=0.5,
                         captured_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
                         is_anomalous=True, width=40, height=30)
        session.add(row)
    values = np.zeros((30, 40), np.uint8)
    values[3:9, 4:12] = 255
    good = tmp_path / f"mask{suffix}"
    cv2.imwrite(str(good), values)
    code, _, err = run(capsys, "label", str(row.id), "anomalous", "--mask", str(good), "--config", str(config))
    assert code == 0, err
    with sessions() as session:
        label = session.scalars(select(Label)).one()
    stored = cv2.imread(str(config.parent / "var" / "artifacts" / label.mask_path), cv2.IMREAD_UNCHANGED)
    assert label.mask_path.endswith("_label.png") and np.array_equal(stored, values)

    small = tmp_path / f"small{suffix}"
    cv2.imwrite(str(small), values[:15, :20])
    code, _, err = run(capsys, "label", str(row.id), "anomalous", "--mask", str(small), "--config", str(config))
    assert code == 2 and "20x15" in err and "40x30" in err
    engine.dispose()
