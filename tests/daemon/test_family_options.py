"""A family declares its own options once (model/options.py, `ModelFamily.options`): a toy family registered from
this test, under a name no project file knows, gets its flags on the CLI (with their help), its `[model]` keys
through the daemon's one options builder, and `create_detector` refuses what it does not declare, naming the family
and what it takes. The built-in families' declarations are read without torch and agree with their builders."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import pytest

from daemon.cli import UsageError
from daemon.commands.model_options import add_model_options, export_sources, model_options
from daemon.config.model_options import clip_model_options, family_model_options, reference_model_options
from daemon.config.settings import ConfigError, load_config
from model.factory import (
    BUILTIN_FAMILIES,
    Capabilities,
    ModelFamily,
    create_detector,
    get_family,
    options_of,
    register_family,
    unregister_model,
)
from model.options import COMMON_OPTIONS, OptionsError, option, option_specs

TOY = "toy-optioned"
OTHER = "toy-plain"


@dataclass(frozen=True)
class ToyOptions:
    gain: float = option(1.0, "how much brighter a defect reads", flag="--gain", minimum=0)
    mode: Literal["mean", "max"] = option("mean", "how the map becomes a score", flag="--toy-mode")
    sharpen: bool = option(False, "sharpen the map first", flag="--sharpen")
    window: int = option(8, "frames remembered (no flag: [model] only)", minimum=1)


built: list[dict[str, Any]] = []  # the options each toy detector was built with


def create_toy(*, device: Any, dtype: Any, **options: Any) -> SimpleNamespace:
    built.append(options)
    return SimpleNamespace(name=TOY, version=f"{TOY}-{options.get('gain', 1.0)}", options=options)


@pytest.fixture
def toy():
    built.clear()
    register_family(ModelFamily(name=TOY, create=create_toy, options=ToyOptions,
                                capabilities=Capabilities(clip_backbone=False)))
    register_family(ModelFamily(name=OTHER, create=create_toy, capabilities=Capabilities(clip_backbone=False)))
    yield
    unregister_model(TOY)
    unregister_model(OTHER)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="predict")
    add_model_options(parser)
    return parser


def _settings(tmp_path, **model: Any):
    return load_config(None, environ={}, overrides={"model": {"name": TOY, **model}, "runtime": {"device": "cpu"},
                                                    "database": {"url": f"sqlite:///{tmp_path}/a.db"},
                                                    "mqtt": {"enabled": False}})


def test_create_detector_takes_declared_options_and_refuses_others_by_name(toy):
    detector = create_detector(TOY, device="cpu", gain=2.5, mode="max", image_size=32, references_later=True)
    assert detector.options == {"gain": 2.5, "mode": "max", "image_size": 32, "references_later": True}
    # a common option every family takes; an own option of another family is not one of them
    create_detector(OTHER, device="cpu", class_name="cube")
    with pytest.raises(OptionsError, match=r"option 'gain': model 'toy-plain' takes the common options .* and its "
                       r"own: none"):
        create_detector(OTHER, device="cpu", gain=2.0)
    with pytest.raises(OptionsError, match=r"option 'gian': model 'toy-optioned' .* its own: gain, mode, sharpen, "
                       r"window"):
        create_detector(TOY, device="cpu", gian=2.0)
    with pytest.raises(OptionsError, match=r"model 'toy-optioned' option 'mode': 'median' is not one of 'mean', 'max'"):
        create_detector(TOY, device="cpu", mode="median")
    with pytest.raises(OptionsError, match=r"option 'gain': -1.0 is below its minimum 0"):
        create_detector(TOY, device="cpu", gain=-1.0)
    with pytest.raises(OptionsError, match=r"option 'window': expected int, got 'many'"):
        create_detector(TOY, device="cpu", window="many")
    assert len(built) == 2  # nothing refused was built
    with pytest.raises(ValueError, match="unknown model"):
        options_of("no-such-model")


def test_cli_adds_the_declared_flags_with_their_help_and_passes_them(toy, capsys):
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--gain GAIN toy-optioned: how much brighter a defect reads (default 1.0)" in shown
    assert "--toy-mode {mean,max}" in shown and "--sharpen, --no-sharpen toy-optioned: sharpen the map first" in shown
    assert "--window" not in shown  # declared without a flag
    # the built-in families' flags, each once, with the models that take it
    assert shown.count("--max-bank-rows MAX_BANK_ROWS patchcore, patchcore-head: reduce") == 1
    assert "--weights WEIGHTS mutual, patchcore, patchcore-head: local weights file" in shown
    assert "--hsf, --no-hsf adaclip: hybrid semantic fusion" in shown

    args = parser.parse_args(["--model", TOY, "--gain", "2.5", "--toy-mode", "max", "--sharpen", "--device", "cpu"])
    options = model_options(args, TOY)
    assert {k: options[k] for k in ("gain", "mode", "sharpen")} == {"gain": 2.5, "mode": "max", "sharpen": True}
    create_detector(TOY, **options)
    assert built[-1]["gain"] == 2.5 and built[-1]["sharpen"] is True
    # not given: not passed (the family's default holds)
    assert "gain" not in model_options(parser.parse_args(["--model", TOY]), TOY)

    with pytest.raises(UsageError, match=r"--gain: model toy-plain does not take it \(an option of toy-optioned\)"):
        model_options(parser.parse_args(["--model", OTHER, "--gain", "2"]), OTHER)
    with pytest.raises(UsageError, match=r"--gain: model 'toy-optioned' option 'gain': -2.0 is below its minimum"):
        model_options(parser.parse_args(["--model", TOY, "--gain", "-2"]), TOY)
    with pytest.raises(UsageError, match=r"--augment: model anomalyclip does not take it \(an option of patchcore, "
                       r"patchcore-head\)"):
        model_options(parser.parse_args(["--model", "anomalyclip", "--augment", "rotate"]), "anomalyclip")


def test_a_flag_for_one_of_several_models_reaches_only_that_model(toy):
    parser = argparse.ArgumentParser()
    add_model_options(parser, several_models=True)
    args = parser.parse_args(["--model", TOY, "--model", OTHER, "--gain", "3", "--device", "cpu"])
    assert model_options(args, TOY)["gain"] == 3.0
    assert "gain" not in model_options(args, OTHER)


def test_model_section_sets_the_family_options_through_the_one_builder(toy, tmp_path):
    settings = _settings(tmp_path, gain=2.0, window=4, image_size=64)
    assert family_model_options(settings) == {"gain": 2.0, "window": 4}
    assert reference_model_options(settings) == {"image_size": 64, "gain": 2.0, "window": 4}
    assert clip_model_options(settings, backbone="b", prompts=None)["gain"] == 2.0
    create_detector(TOY, **reference_model_options(settings), **{"device": "cpu"})
    assert built[-1] == {"image_size": 64, "gain": 2.0, "window": 4}
    # for a family built from this [model] that does not declare them (e.g. the zero-label family): left out
    assert reference_model_options(settings, OTHER) == {"image_size": 64}

    # from the environment: text, converted by the declaration
    env = load_config(None, environ={"ANOMALYD_MODEL__NAME": TOY, "ANOMALYD_MODEL__WINDOW": "16",
                                     "ANOMALYD_MODEL__SHARPEN": "true",
                                     "ANOMALYD_DATABASE__URL": f"sqlite:///{tmp_path}/a.db",
                                     "ANOMALYD_MQTT__ENABLED": "false"})
    assert family_model_options(env) == {"window": 16, "sharpen": True}
    with pytest.raises(ConfigError, match=r"environment variable ANOMALYD_MODEL__WINDOW: \[model\]\.window: model "
                       r"'toy-optioned' option 'window': 0 is below its minimum 1"):
        load_config(None, environ={"ANOMALYD_MODEL__NAME": TOY, "ANOMALYD_MODEL__WINDOW": "0"})

    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nname = "{TOY}"\ngian = 2.0\n')
    with pytest.raises(ConfigError, match=r"config.toml: \[model\]\.gian: option 'gian': model 'toy-optioned' has no "
                       r"such option \(its own options: gain, mode, sharpen, window\)"):
        load_config(config, environ={})
    config.write_text(f'[model]\nname = "{TOY}"\nmode = "median"\n')
    with pytest.raises(ConfigError, match=r"option 'mode': 'median' is not one of 'mean', 'max'"):
        load_config(config, environ={})
    # a family's own key under another family is refused, and so is a common option that is no [model] key
    config.write_text('[model]\nname = "anomalyclip"\nmax_bank_rows = 1000\n')
    with pytest.raises(ConfigError, match=r"option 'max_bank_rows': model 'anomalyclip' has no such option \(its own "
                       r"options: none\)"):
        load_config(config, environ={})
    config.write_text(f'[model]\nname = "{TOY}"\ndevice = "cpu"\n')
    with pytest.raises(ConfigError, match="option 'device'"):
        load_config(config, environ={})


def test_builtin_declarations_load_without_torch_and_agree_with_their_builders():
    probe = ("import sys; from model.factory import list_models, options_of; from model.options import option_specs;"
             "[option_specs(options_of(n)) for n in list_models()];"
             "import daemon.commands.model_options as m, argparse; m.add_model_options(argparse.ArgumentParser());"
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

    declared = {name: [s.name for s in option_specs(options_of(name))] for name in BUILTIN_FAMILIES}
    assert declared["patchcore"] == ["weights", "taps", "augment", "max_bank_rows"]
    assert declared["patchcore-head"] == [*declared["patchcore"], "head"]
    assert declared["adaclip"][0] == "hsf" and declared["anomalyclip"] == []
    for name in BUILTIN_FAMILIES:
        family = get_family(name)
        assert family.options is options_of(name)
        builder = inspect.signature(family.create).parameters
        for spec in option_specs(family.options):
            assert spec.name not in COMMON_OPTIONS
            if spec.name in builder and builder[spec.name].default is not inspect.Parameter.empty:
                assert builder[spec.name].default == spec.default, (name, spec.name)


def test_export_sources_name_the_family_weights_files(tmp_path):
    parser = _parser()
    head = tmp_path / "head.safetensors"
    args = parser.parse_args(["--model", "patchcore-head", "--head", str(head), "--weights", "w.pth"])
    assert export_sources(args, "patchcore-head") == {"backbone": None, "backbone_config": None, "prompts": None,
                                                      "weights": "w.pth", "head": str(head), "references": None}
