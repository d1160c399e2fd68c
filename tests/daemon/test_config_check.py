"""`anomalyd config check`: the config and the files it names, checked without starting anything."""

from __future__ import annotations

import json

from daemon.cli import main


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_config_check_reports_missing_files_and_creates_nothing(tmp_path, golden_dir, capsys):
    config = tmp_path / "config.toml"
    config.write_text(f"""[model]
backbone = "{golden_dir / 'tiny_clip_openai_fp16.safetensors'}"
backbone_config = "{golden_dir / 'tiny-clip-24L.json'}"
prompts = "{golden_dir / 'prompts_official_format.pth'}"
[[sources]]
id = "inbox"
kind = "folder"
uri = "var/inbox"
[[sources]]
id = "replay"
kind = "video"
uri = "clips/missing.mp4"
[database]
url = "sqlite:///var/a.db"
""")
    code, out, err = run(capsys, "config", "check", "--json", "--config", str(config))
    assert code == 1, err
    report = json.loads(out)
    errors = [f["message"] for f in report["findings"] if f["level"] == "error"]
    assert errors == [f"source replay: video file {tmp_path / 'clips' / 'missing.mp4'} does not exist"]
    warnings = " ".join(f["message"] for f in report["findings"] if f["level"] == "warning")
    assert "var/inbox does not exist yet" in warnings and "a.db does not exist yet" in warnings
    assert "first start creates an admin token" in warnings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]  # nothing created

    config.write_text(config.read_text().replace('kind = "video"\nuri = "clips/missing.mp4"',
                                                 'kind = "rtsp"\nuri = "rtsp://cam/1"'))
    code, out, _ = run(capsys, "config", "check", "--config", str(config))
    assert code == 0 and "0 error(s)" in out

    config.write_text(config.read_text() + "\n[mqtt]\nhots = 'x'\n")
    code, _, err = run(capsys, "config", "check", "--config", str(config))
    assert code == 2 and "unknown key [mqtt].hots" in err


def test_config_check_names_missing_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ANOMALYD_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "config.toml"
    config.write_text('[model]\nname = "clip-ac"\nbackbone = "ViT-L-14-336"\n')
    code, out, _ = run(capsys, "config", "check", "--config", str(config))
    assert code == 1
    assert "CLIP backbone ViT-L-14-336/openai is missing" in out
    assert str(tmp_path / "cache" / "open_clip" / "ViT-L-14-336" / "openai") in out
    assert "prompts" not in out  # a training-free model needs no prompts
