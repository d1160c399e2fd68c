"""Downloading and locating weights: the CLIP backbone (through open_clip's cache) and the released AnomalyCLIP
prompt checkpoints. This is the only module that reaches the network for weights; the model package never does.

Named prompts (`--prompts anomalyclip-visa`) resolve to files in the cache directory:
`$ANOMALYD_CACHE` or `$XDG_CACHE_HOME/anomalyd` or `~/.cache/anomalyd`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_RELEASES = "https://raw.githubusercontent.com/zqhang/AnomalyCLIP/main/checkpoints"


@dataclass(frozen=True)
class ReleasedPrompts:
    name: str
    url: str
    trained_on: str
    use_for: str


RELEASED_PROMPTS = {
    p.name: p
    for p in (
        ReleasedPrompts("anomalyclip-visa", f"{_RELEASES}/9_12_4_multiscale_visa/epoch_15.pth", "VisA",
                        "MVTec AD and other industrial data (the paper's protocol for MVTec AD)"),
        ReleasedPrompts("anomalyclip-mvtec", f"{_RELEASES}/9_12_4_multiscale/epoch_15.pth", "MVTec AD",
                        "VisA, MPDD, BTAD and other industrial data"),
    )
}
DEFAULT_PROMPTS = "anomalyclip-visa"
BACKBONE_NAME, BACKBONE_TAG = "ViT-L-14-336", "openai"
# Shapes the released ViT-L/14@336 prompts must have: n_ctx 12, depth 9, deep length 4, text width 768.
EXPECTED_PROMPT_SHAPE = {"n_ctx": 12, "depth": 9, "deep_length": 4, "width": 768}


class WeightsError(RuntimeError):
    """A download that failed or a file that is not what it should be; says what to get and where to put it."""


def cache_dir() -> Path:
    if os.environ.get("ANOMALYD_CACHE"):
        return Path(os.environ["ANOMALYD_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "anomalyd"


def open_clip_cache() -> Path:
    return cache_dir() / "open_clip"


def prompts_path(name: str) -> Path:
    return cache_dir() / "prompts" / f"{name}.pth"


def resolve_prompts(value: str | Path | None) -> Path | None:
    """A prompts option → a file: an existing path, or a released name whose file is in the cache."""
    if value is None or str(value) == "":
        return None
    path = Path(value).expanduser()
    if path.exists() or str(value) not in RELEASED_PROMPTS:
        return path
    cached = prompts_path(str(value))
    if not cached.is_file():
        raise WeightsError(
            f"prompts {value!r} are not downloaded yet: run `anomalyd weights fetch` (or download "
            f"{RELEASED_PROMPTS[str(value)].url} by hand and save it as {cached})"
        )
    return cached


def download(url: str, target: Path, *, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download url to target atomically, with a progress bar; WeightsError says what to do when offline."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp, tqdm(
                total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress
            ) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    tmp.write(chunk)
                    bar.update(len(chunk))
        Path(tmp.name).replace(target)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise WeightsError(
            f"could not download {url} ({getattr(exc, 'reason', exc)}). On a machine without internet, download "
            f"it elsewhere and put it at {target}"
        ) from exc
    return target


def check_prompts(path: Path) -> dict[str, int]:
    from model.checkpoints import load_prompts

    shape = load_prompts(path).learner_shape
    if shape != EXPECTED_PROMPT_SHAPE:
        raise WeightsError(f"{path}: prompt shapes {shape} are not the released ViT-L/14@336 ones {EXPECTED_PROMPT_SHAPE}")
    return shape


def fetch_prompts(name: str, *, force: bool = False, progress: bool = True) -> Path:
    if name not in RELEASED_PROMPTS:
        raise WeightsError(f"unknown released prompts {name!r}: expected one of {', '.join(RELEASED_PROMPTS)}")
    target = prompts_path(name)
    if force or not target.is_file():
        download(RELEASED_PROMPTS[name].url, target, progress=progress)
    check_prompts(target)
    return target


def fetch_backbone(name: str = BACKBONE_NAME, tag: str = BACKBONE_TAG) -> Path:
    """Download the CLIP weights through open_clip into our cache and check the tower sizes."""
    from model import load_backbone
    from model._backbone import BackboneError

    target = open_clip_cache()
    target.mkdir(parents=True, exist_ok=True)
    try:
        backbone = load_backbone(name, pretrained=tag, cache_dir=str(target))
    except BackboneError as exc:
        reason = str(exc.__cause__ or exc).rstrip(".")
        raise WeightsError(
            f"could not download {name}/{tag} through open_clip ({reason}). Without internet, copy OpenAI's "
            f"ViT-L-14-336px.pt to this machine and pass its path with --backbone (or [model].backbone in config.toml)"
        ) from exc
    sizes = (backbone.vision_width, backbone.vision_layers, backbone.patch_size, backbone.text_width)
    if name == BACKBONE_NAME and sizes != (1024, 24, 14, 768):
        raise WeightsError(f"{name}/{tag}: unexpected tower sizes {sizes}, expected (1024, 24, 14, 768)")
    return target


def clear_partial_downloads() -> None:
    for part in (cache_dir() / "prompts").glob("*.part"):
        part.unlink(missing_ok=True)


__all__ = [
    "DEFAULT_PROMPTS",
    "RELEASED_PROMPTS",
    "WeightsError",
    "cache_dir",
    "download",
    "fetch_backbone",
    "fetch_prompts",
    "resolve_prompts",
]
