"""Weights for the configured model: `weights fetch` gets exactly what the config needs into the cache, the daemon
loads the backbone from that cache with no network call, and offline the error says what to put where.

Nothing is downloaded: the URL resolution is monkeypatched to a fake URL served from the golden tiny CLIP, and
every network entry point (urllib, open_clip's loader, huggingface_hub) fails the test if the daemon touches it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import ClassVar

import pytest

from adapters import weights
from daemon.cli import main
from daemon.config.settings import load_config

FAKE_URL = "https://weights.example.invalid/tiny-clip/open_clip_pytorch_model.bin"


def write_config(tmp_path: Path, golden_dir: Path, prompts: str | None) -> Path:
    path = tmp_path / "config.toml"
    prompts_line = f'prompts = "{prompts}"' if prompts else ""
    path.write_text(f"""[model]
backbone = "tiny-clip"
backbone_config = "{golden_dir / 'tiny-clip-24L.json'}"
{prompts_line}
image_size = 112
[runtime]
device = "cpu"
[database]
url = "sqlite:///var/test.db"
""")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ANOMALYD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "backbone_sources", lambda name, tag="openai": [(FAKE_URL, Path(FAKE_URL).name)])
    return tmp_path / "cache"


class FakeResponse(io.BytesIO):
    headers: ClassVar[dict[str, str]] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve(monkeypatch, files: dict[str, bytes]) -> list[str]:
    requested: list[str] = []

    def urlopen(url, timeout=None):
        requested.append(url)
        if url not in files:
            raise AssertionError(f"unexpected download of {url}")
        return FakeResponse(files[url])

    monkeypatch.setattr(weights.urllib.request, "urlopen", urlopen)
    return requested


def no_network(monkeypatch) -> None:
    import huggingface_hub
    import open_clip

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args} {kwargs}")

    monkeypatch.setattr(weights.urllib.request, "urlopen", refuse)
    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", refuse)


def test_fetch_gets_only_what_the_config_needs_then_the_daemon_loads_it_offline(tmp_path, golden_dir, cache,
                                                                              monkeypatch, capsys):
    config = write_config(tmp_path, golden_dir, str(golden_dir / "prompts_official_format.pth"))
    import torch
    from safetensors.torch import load_file

    buffer = io.BytesIO()  # a PyTorch state-dict file, as open_clip's Hugging Face repos serve
    torch.save(load_file(str(golden_dir / "tiny_clip_openai_fp16.safetensors")), buffer)
    tiny = buffer.getvalue()
    requested = serve(monkeypatch, {FAKE_URL: tiny})
    assert main(["weights", "fetch", "--config", str(config)]) == 0
    assert requested == [FAKE_URL]  # the backbone only: the prompts are a local file, no released ones fetched
    cached = cache / "open_clip" / "tiny-clip" / "openai" / "open_clip_pytorch_model.bin"
    assert cached.read_bytes() == tiny
    assert not (cache / "prompts").exists()

    no_network(monkeypatch)
    capsys.readouterr()
    assert main(["weights", "fetch", "--if-missing", "--config", str(config)]) == 0  # `make run`'s first step
    assert "already in the cache" in capsys.readouterr().out

    from daemon.process.service import build_detector

    detector = build_detector(load_config(config, environ={}))
    assert detector.model.backbone.name == str(cached)
    scores = detector.predict(torch.zeros(1, 3, 112, 112)).scores
    assert scores.shape == (1,) and torch.isfinite(scores).all()


def test_offline_error_names_each_missing_file_its_url_and_place(tmp_path, golden_dir, cache, monkeypatch):
    config = write_config(tmp_path, golden_dir, None)  # AnomalyCLIP's default: the released VisA prompts
    no_network(monkeypatch)
    from daemon.process.service import build_detector

    with pytest.raises(weights.WeightsError) as raised:
        build_detector(load_config(config, environ={}))
    message = str(raised.value)
    assert FAKE_URL in message
    assert f"put it at {cache / 'open_clip' / 'tiny-clip' / 'openai' / 'open_clip_pytorch_model.bin'}" in message
    assert weights.released()["anomalyclip-visa"].url in message
    assert f"put it at {cache / 'prompts' / 'anomalyclip-visa.pth'}" in message
    assert "anomalyclip-mvtec" not in message and "make demo" in message


def test_required_weights_follow_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYD_CACHE", str(tmp_path))
    names = lambda items: [item.what for item in items]  # noqa: E731
    assert names(weights.required_weights("anomalyclip", "ViT-L-14-336", None)) == [
        "CLIP backbone ViT-L-14-336/openai", "released prompts anomalyclip-visa"]
    assert names(weights.required_weights("anomalyclip", "ViT-L-14-336", "anomalyclip-mvtec"))[1:] == [
        "released prompts anomalyclip-mvtec"]
    local = tmp_path / "clip.safetensors"
    local.write_bytes(b"x")
    prompts = tmp_path / "p.pth"
    prompts.write_bytes(b"x")
    assert weights.required_weights("anomalyclip", str(local), str(prompts)) == []
    assert names(weights.required_weights("winclip", "ViT-L-14-336", None)) == ["CLIP backbone ViT-L-14-336/openai"]
    backbone = weights.required_weights("clip", "ViT-L-14-336", None)[0]
    # the real download candidates come from open_clip's own table: Hugging Face first, OpenAI's URL last
    assert backbone.urls[0].startswith("https://huggingface.co/timm/vit_large_patch14_clip_336.openai/resolve/main/")
    assert backbone.urls[-1].endswith("/ViT-L-14-336px.pt")
    assert backbone.path == tmp_path / "open_clip" / "ViT-L-14-336" / "openai" / "open_clip_pytorch_model.bin"


def test_released_weights_are_a_family_declaration_checked_by_digest_and_by_the_family(tmp_path, golden_dir, cache,
                                                                                      monkeypatch, capsys):
    """`weights fetch --prompts NAME` downloads any family's declared `ReleasedWeights` (model/factory.py), refuses a
    file whose sha256 differs, and reports the family's own check (AnomalyCLIP's: the released prompt shapes)."""
    import hashlib

    from model.factory import ReleasedWeights, register_model, unregister_model

    good, url = b"toy weights", "https://weights.example.invalid/toy.bin"
    release = ReleasedWeights("toy-released", url, sha256=hashlib.sha256(good).hexdigest(),
                              check=lambda path: None if path.read_bytes() == good else f"{path}: not toy weights")
    register_model("toy-released-family", released_weights=(release,))(lambda **_: None)
    try:
        assert weights.released()["toy-released"] is release
        serve(monkeypatch, {url: good})
        assert main(["weights", "fetch", "--skip-backbone", "--prompts", "toy-released"]) == 0
        assert (cache / "prompts" / "toy-released.pth").read_bytes() == good
        serve(monkeypatch, {url: b"something else"})
        assert main(["weights", "fetch", "--force", "--skip-backbone", "--prompts", "toy-released"]) == 1
        assert f"is not that of the released toy-released ({release.sha256})" in capsys.readouterr().err
    finally:
        unregister_model("toy-released-family")
    assert "toy-released" not in weights.released()
    with pytest.raises(SystemExit) as usage:  # a usage error now
        main(["weights", "fetch", "--skip-backbone", "--prompts", "toy-released"])
    assert usage.value.code == 2 and "not a released name (anomalyclip-visa, anomalyclip-mvtec)" in capsys.readouterr().err

    tiny_prompts = (golden_dir / "prompts_official_format.pth").read_bytes()  # the tiny CLIP's: not the released shapes
    serve(monkeypatch, {weights.released()["anomalyclip-visa"].url: tiny_prompts})
    assert main(["weights", "fetch", "--skip-backbone", "--prompts", "anomalyclip-visa"]) == 1
    assert "are not the released ViT-L/14@336 ones" in capsys.readouterr().err
