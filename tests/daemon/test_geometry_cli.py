"""`anomalyd predict` and `eval` with the frame geometry options (--resize, --roi, --ignore-polygon): the same
geometry as the daemon's, maps in each image's own pixels, and clear usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.cli import main
from tests.model.test_geometry import draw_defect, texture


def _write(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def test_predict_tile_gives_maps_in_the_images_own_pixels(tmp_path, capsys):
    references = [_write(tmp_path / "refs" / f"{seed}.png", texture(300, 900, seed)) for seed in (1, 2)]
    good = _write(tmp_path / "in" / "good.png", texture(300, 900, 3))
    bad = _write(tmp_path / "in" / "bad.png", draw_defect(texture(300, 900, 4), 700, 100))
    out = tmp_path / "out.npz"
    code = main(["predict", str(good), str(bad), "--model", "patchcore", "--device", "cpu", "--references",
                 ",".join(map(str, references)), "--resize", "tile", "--roi", "0,0,900,300",
                 "--ignore-polygon", "0,0;50,0;50,50;0,50", "--output", str(out), "--json"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    saved = np.load(out)
    assert saved["maps"].shape == (2, 300, 900)
    assert "-tile-o25-roi0x0x900x300-ign" in str(saved["model_version"])
    bad_map = saved["maps"][1]
    y, x = np.unravel_index(np.argmax(bad_map), bad_map.shape)
    assert abs(x - 700) <= 30 and abs(y - 100) <= 30, (x, y)
    assert bad_map[:20, :20].max() == 0.0  # ignored
    assert lines[1]["score"] > 1.5 * lines[0]["score"]


def test_geometry_options_are_checked(tmp_path, capsys):
    image = _write(tmp_path / "a.png", texture(64, 64, 1))
    with pytest.raises(SystemExit):
        main(["predict", str(image), "--model", "patchcore", "--roi", "1,2,3"])
    assert "expected X,Y,WIDTH,HEIGHT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", str(image), "--model", "patchcore", "--ignore-polygon", "1,2;3,4"])
    assert "at least 3 points" in capsys.readouterr().err


def _small_magnetic_tile(samples_dir: Path, root: Path) -> Path:
    """An MVTec-layout copy (links) of a few magnetic_tile frames of different sizes: 6 good, 6 cracked."""
    source = samples_dir / "magnetic_tile"
    for kind, count in (("good", 6), ("crack", 6)):
        for image in sorted((source / "test" / kind).glob("*.jpg"))[:count]:
            target = root / "magnetic_tile" / "test" / kind / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(image)
            mask = source / "ground_truth" / kind / f"{image.stem}_mask.png"
            if kind != "good":
                (root / "magnetic_tile" / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                (root / "magnetic_tile" / "ground_truth" / kind / mask.name).symlink_to(mask)
    return root


@pytest.mark.shared
def test_eval_fit_scores_in_the_images_own_pixels(samples_dir: Path, tmp_path: Path, capsys) -> None:
    """magnetic_tile's frames differ in size; with --resize fit each is scored at its own aspect and its pixel
    AUROC is computed against its full-size mask."""
    data = _small_magnetic_tile(samples_dir, tmp_path / "data")
    assert main(["eval", "--data", str(data), "--model", "patchcore", "--device", "cpu", "--shots", "2",
                 "--resize", "fit", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["patchcore"]["per_category"]["magnetic_tile"]
    assert printed["n_anomalous"] == 6 and printed["n_images"] > 6  # the good ones less the reference pool
    assert printed["image_auroc"] is not None and 0.5 < printed["pixel_auroc"] <= 1.0
