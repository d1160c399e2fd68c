"""Downloading and locating weights: the CLIP backbone (through open_clip's cache) and the learned weights a model
family released (`ModelFamily.released_weights` in model/factory.py: name, URL, digest, check; AnomalyCLIP's
prompts, say). This is the only module that reaches the network for weights; the model package never does.

Named weights (`--prompts anomalyclip-visa`) resolve to files in the cache directory:
`$ANOMALYD_CACHE` or `$XDG_CACHE_HOME/anomalyd` or `~/.cache/anomalyd`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.factory import ReleasedWeights

log = logging.getLogger(__name__)

BACKBONE_NAME, BACKBONE_TAG = "ViT-L-14-336", "openai"


def released() -> dict[str, ReleasedWeights]:
    """Every family's released weights by name (`model.factory.released_weights`; no model code loaded)."""
    from model.factory import released_weights

    return released_weights()


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
    known = released()
    if path.exists() or str(value) not in known:
        return path
    cached = prompts_path(str(value))
    if not cached.is_file():
        raise WeightsError(
            f"prompts {value!r} are not downloaded yet: run `anomalyd weights fetch` (or download "
            f"{known[str(value)].url} by hand and save it as {cached})"
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_released(item: ReleasedWeights, path: Path) -> None:
    """WeightsError when `path` is not the released weights `item` (its digest, when declared; its family's check)."""
    if item.sha256 and (found := file_sha256(path)) != item.sha256.lower():
        raise WeightsError(f"{path}: sha256 {found} is not that of the released {item.name} ({item.sha256}); delete "
                           f"it and run `anomalyd weights fetch` again")
    problem = item.check(path) if item.check is not None else None
    if problem:
        raise WeightsError(problem)


def fetch_prompts(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Download the released weights `name` (any family's) into the cache and check them."""
    known = released()
    if name not in known:
        raise WeightsError(f"unknown released prompts {name!r}: expected one of {', '.join(known)}")
    target = prompts_path(name)
    if force or not target.is_file():
        download(known[name].url, target, progress=progress)
    check_released(known[name], target)
    return target


# --- the files a configured model needs -----------------------------------------------------------------------

# open_clip's Hugging Face weight files: its default PyTorch file (every open_clip repo has it), then the
# safetensors copy some repos add. Both load the same (read_state_dict).
_HF_WEIGHTS = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class WeightFile:
    """One file a configured model needs: where it comes from (download candidates, first first) and where it goes.

    `path` is where `weights fetch` puts the first candidate and where a user copying the file by hand puts it;
    `accepted` are all the places the daemon loads it from (one per candidate file name)."""

    what: str
    urls: tuple[str, ...]
    path: Path
    accepted: tuple[Path, ...]

    def found(self) -> Path | None:
        return next((path for path in self.accepted if path.is_file()), None)


def backbone_sources(name: str, tag: str = BACKBONE_TAG) -> list[tuple[str, str]]:
    """(URL, file name) candidates for open_clip's `name`/`tag` weights, from open_clip's own pretrained table:
    the Hugging Face files, then the original URL when it has one."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise WeightsError(f"open_clip has no pretrained weights {name}/{tag} (tags for {name}: {tags}); set "
                           f"[model].backbone to an open_clip name or to a local weights file")
    sources: list[tuple[str, str]] = []
    hub = str(cfg.get("hf_hub") or "")
    if hub:
        repo, filename = os.path.split(hub)  # "org/repo/" (default file names) or "org/repo/file"
        names = (filename,) if filename and filename not in _HF_WEIGHTS else _HF_WEIGHTS
        sources += [(f"https://huggingface.co/{repo}/resolve/main/{item}", item) for item in names]
    if cfg.get("url"):
        sources.append((str(cfg["url"]), os.path.basename(str(cfg["url"]))))
    return sources


def backbone_dir(name: str, tag: str = BACKBONE_TAG) -> Path:
    return open_clip_cache() / name / tag


def is_named_backbone(value: str | Path) -> bool:
    """An open_clip model name rather than a weights file."""
    path = Path(value).expanduser()
    return not path.exists() and path.suffix not in _WEIGHT_SUFFIXES and "/" not in str(value)


def backbone_weights(name: str, tag: str = BACKBONE_TAG) -> WeightFile:
    sources = backbone_sources(name, tag)
    folder = backbone_dir(name, tag)
    return WeightFile(what=f"CLIP backbone {name}/{tag}", urls=tuple(url for url, _ in sources),
                      path=folder / sources[0][1], accepted=tuple(folder / filename for _, filename in sources))


def prompts_weights(name: str) -> WeightFile:
    target = prompts_path(name)
    return WeightFile(what=f"released prompts {name}", urls=(released()[name].url,), path=target,
                      accepted=(target,))


def required_weights(model: str, backbone: str | Path | None, prompts: str | Path | None,
                     tag: str = BACKBONE_TAG) -> list[WeightFile]:
    """The downloadable files a model configuration needs, and nothing else: the named CLIP backbone (not a
    local file) and released weights named by the configuration (the family's `default_weights` when it names
    none)."""
    from model.factory import get_family

    family = get_family(model)  # a family without a CLIP backbone (PatchCore's CNNs) needs nothing from open_clip
    needed: list[WeightFile] = []
    if backbone and family.caps.clip_backbone and is_named_backbone(backbone):
        needed.append(backbone_weights(str(backbone), tag))
    if prompts is None:
        prompts = family.default_weights
    if prompts is not None and str(prompts) in released() and not Path(prompts).expanduser().exists():
        needed.append(prompts_weights(str(prompts)))
    return needed


def missing_weights_message(missing: list[WeightFile]) -> str:
    lines = ["model weights are missing (this machine cannot download them, or `anomalyd weights fetch` has not "
             "run yet):"]
    for item in missing:
        lines.append(f"  - {item.what}: download {item.urls[0]}")
        lines.append(f"    and put it at {item.path}")
        if len(item.urls) > 1:
            alternatives = "; ".join(f"{url} -> {path}" for url, path in zip(item.urls[1:], item.accepted[1:],
                                                                             strict=False))
            lines.append(f"    (or: {alternatives})")
    lines.append("Then start again (`make run` fetches them itself where there is internet). To try anomalyd "
                 "without these weights, `make demo` runs the shipped config on the tiny test CLIP from ../shared.")
    return "\n".join(lines)


def ensure_weights(needed: list[WeightFile]) -> None:
    """Raise WeightsError naming each missing file, its URL and where to put it."""
    missing = [item for item in needed if item.found() is None]
    if missing:
        raise WeightsError(missing_weights_message(missing))


def local_backbone(value: str | Path, tag: str = BACKBONE_TAG) -> str:
    """A [model].backbone value → what the daemon loads: a file as is, a named open_clip backbone → its weights
    file in the cache that `anomalyd weights fetch` filled (never a download: WeightsError when it is missing)."""
    if not is_named_backbone(value):
        return str(value)
    item = backbone_weights(str(value), tag)
    found = item.found()
    if found is None:
        raise WeightsError(missing_weights_message([item]))
    return str(found)


def fetch_weight_file(item: WeightFile, *, force: bool = False, progress: bool = True) -> Path:
    """Download the first candidate URL that answers into its place (nothing when one is already there)."""
    found = item.found()
    if found is not None and not force:
        return found
    failures = []
    for url, target in zip(item.urls, item.accepted, strict=False):
        try:
            return download(url, target, progress=progress)
        except WeightsError as exc:
            failures.append(str(exc.__cause__ or exc))
    raise WeightsError(f"could not download {item.what} ({'; '.join(failures)}).\n"
                       + missing_weights_message([item]))


def fetch_backbone(name: str = BACKBONE_NAME, tag: str = BACKBONE_TAG, *, force: bool = False,
                   progress: bool = True, config: str | Path | None = None) -> Path:
    """Download the CLIP weights file into the cache (where the daemon loads it from) and check the towers."""
    from model import load_backbone
    from model._backbone import BackboneError

    path = fetch_weight_file(backbone_weights(name, tag), force=force, progress=progress)
    try:
        backbone = load_backbone(path, config=config)
    except BackboneError as exc:
        raise WeightsError(f"{path} was downloaded for {name}/{tag} but does not load: {exc}") from exc
    sizes = (backbone.vision_width, backbone.vision_layers, backbone.patch_size, backbone.text_width)
    if name == BACKBONE_NAME and sizes != (1024, 24, 14, 768):
        raise WeightsError(f"{name}/{tag}: unexpected tower sizes {sizes}, expected (1024, 24, 14, 768)")
    return path


def clear_partial_downloads() -> None:
    for part in (cache_dir() / "prompts").glob("*.part"):
        part.unlink(missing_ok=True)


__all__ = [
    "WeightFile",
    "WeightsError",
    "cache_dir",
    "download",
    "ensure_weights",
    "fetch_backbone",
    "fetch_prompts",
    "local_backbone",
    "released",
    "required_weights",
    "resolve_prompts",
]
