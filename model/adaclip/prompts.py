"""AdaCLIP's class-aware text prompts: 7 normal and 5 anomalous states x 4 templates per class (official lists)."""

from __future__ import annotations

import functools

import torch

from model._text import tokenize

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = ("a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
             "a cropped photo of the {}.")


class ClassNameError(ValueError):
    """Class names missing or not matching the batch; AdaCLIP's text prompts need one per image."""

def class_prompts(class_name: str) -> tuple[list[str], int]:
    """The 48 prompt sentences for a class (normal states first) and how many are normal. As in the official
    code, '-' becomes a space; '_' is kept."""
    name = class_name.replace("-", " ")
    normal = [template.format(state.format(name)) for state in NORMAL_STATES for template in TEMPLATES]
    anomalous = [template.format(state.format(name)) for state in ANOMALOUS_STATES for template in TEMPLATES]
    return normal + anomalous, len(normal)


@functools.lru_cache(maxsize=256)
def class_token_ids(class_name: str, context_length: int) -> torch.Tensor:
    """Token ids (48, context_length) of a class's prompt sentences; cached per class."""
    sentences, _ = class_prompts(class_name)
    try:
        return tokenize(sentences, context_length)
    except ValueError as exc:
        raise ClassNameError(f"class name {class_name!r} is too long: {exc}") from exc
