"""Config files of the training script: a recipe is a small JSON file whose values become the parser's defaults.

    {"extends": "digits.json", "demo": "package.module:OBJECT", "learning_rate": 1e-4, "encoders": ["./x"]}

Every key but two is an argument of ``train_fd_onestep.py`` (its ``--name`` without dashes) with the value the
run uses unless the command line gives it (nanoGPT's configurator, diffusers' argparse defaults: the config's
values become ``parser.set_defaults`` before ``parse_args``, so an explicit flag always wins). A string that starts
with ``./`` or ``../`` (alone, or in a list) is a path relative to the config file. The two reserved keys:

- ``extends``: another config file (relative to this one) whose values this one starts from;
- ``demo``: ``"module:attribute"``, the object holding a bundled demo's hooks (its encoder names, prompts,
  classifier, real images, model-card line and end-of-run comparison), imported by name (:func:`load_object`).

The bundled configs live with their demo, ``fd_onestep/demos/<demo>/configs/<name>.json`` (the offline embedded
defaults, ``--embedded_default``), and ``fd_onestep/demos/<demo>/presets/<name>.json`` (``--preset``, on top of one).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["RESERVED_KEYS", "TIED_ARGS", "Config", "load_config", "bundled_configs", "bundled_config_path",
           "select_config", "apply_config", "config_values_in_effect", "load_object", "config_report"]

RESERVED_KEYS = ("extends", "demo")
# an argument whose config value belongs to another one's config value: given the other on the command line,
# the config's value of this one is dropped (the statistics of the config's encoders are not the user's encoders')
TIED_ARGS = {"reference_stats": "encoders", "encoder_loss_weights": "encoders",
             "eval_reference_stats": "eval_encoders"}


@dataclass
class Config:
    """The config files a run uses (in order; later ones win) and the values they set (``demo`` included)."""

    files: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    embedded_default: str | None = None  # the bundled config's name, for the offline embedded defaults

    @property
    def arguments(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k not in RESERVED_KEYS}


def _resolve(value: Any, folder: Path) -> Any:
    if isinstance(value, list):
        return [_resolve(v, folder) for v in value]
    if isinstance(value, str) and value.startswith(("./", "../")):
        return os.path.normpath(folder / value)
    return value


def load_config(path: str | os.PathLike, _seen: tuple = ()) -> dict[str, Any]:
    """The values of config file ``path`` (its ``extends`` chain first), relative paths made absolute."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r} does not exist; pass a JSON config file (the bundled ones: "
                                f"{', '.join(sorted(bundled_configs()))}).")
    if path in _seen:
        raise ValueError(f"config {str(path)!r} extends itself (through {[str(p) for p in _seen]}).")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config {str(path)!r} is not valid JSON ({err}); write one object of argument: value.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {str(path)!r} must hold one JSON object of argument names and values.")
    values: dict[str, Any] = {}
    if "extends" in raw:
        values.update(load_config(path.parent / raw["extends"], (*_seen, path)))
    values.update({k: _resolve(v, path.parent) for k, v in raw.items() if k != "extends"})
    return values


def bundled_configs(kind: str = "configs") -> dict[str, Path]:
    """``{name: file}`` of the bundled configs (``kind="configs"``: embedded defaults; ``"presets"``), from every
    demo package under ``fd_onestep.demos``."""
    found = {}
    demos = resources.files("fd_onestep.demos")
    for demo in sorted(demos.iterdir(), key=lambda p: p.name):
        folder = demo / kind
        if folder.is_dir():
            for entry in sorted(folder.iterdir(), key=lambda p: p.name):
                if entry.name.endswith(".json"):
                    found[entry.name[: -len(".json")]] = Path(str(entry))
    return found


def bundled_config_path(name: str, kind: str = "configs") -> Path:
    return bundled_configs(kind)[name]


def select_config(args: argparse.Namespace, default_embedded: str) -> Config:
    """The configs a command line asks for (``args``: parsed without any config): ``--config FILE...``, or the
    bundled ``--embedded_default`` (``default_embedded`` when no model, encoders or statistics are given), then
    ``--preset``. Raises ValueError naming the conflict."""
    user_model = any(getattr(args, n) is not None for n in ("pretrained_model_name_or_path", "encoders", "reference_stats"))
    config = Config()
    if args.config and args.embedded_default:
        raise ValueError("--config and --embedded_default both name a config; pass one of the two.")
    if args.embedded_default is not None and args.pretrained_model_name_or_path is not None:
        raise ValueError(
            f"--embedded_default {args.embedded_default} runs the bundled digits assets: drop it, or drop "
            "--pretrained_model_name_or_path (encoders and statistics may be given: they replace the config's)."
        )
    if args.config:
        config.files = [str(Path(f).expanduser().resolve()) for f in args.config]
    elif args.embedded_default is not None or not user_model:
        config.embedded_default = args.embedded_default or default_embedded
        config.files = [str(bundled_config_path(config.embedded_default))]
    for file in config.files:
        config.values.update(load_config(file))
    if args.preset is not None:
        if "demo" not in config.values:
            raise ValueError(f"--preset {args.preset} is a recipe of the offline digits defaults (its values were made "
                             "for them): drop it, or drop --pretrained_model_name_or_path / --encoders / "
                             "--reference_stats to run it on the digits default.")
        config.files.append(str(bundled_config_path(args.preset, "presets")))
        config.values.update(load_config(config.files[-1]))
    return config


def apply_config(parser: argparse.ArgumentParser, config: Config) -> dict[str, Any]:
    """The config's values as the parser's defaults (explicit flags still win); returns the parser's own defaults
    of those arguments (the defaults of a run without a config). Raises ValueError for an unknown key."""
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(config.arguments) - known)
    if unknown:
        raise ValueError(f"config {config.files} sets {['--' + k for k in unknown]}, which train_fd_onestep.py does "
                         "not have; fix the key (an argument's name without its dashes).")
    plain = {k: parser.get_default(k) for k in config.arguments}
    parser.set_defaults(**{k: list(v) if isinstance(v, list) else v for k, v in config.arguments.items()})
    return plain


def config_values_in_effect(args: argparse.Namespace, config: Config, plain: dict[str, Any]) -> dict[str, Any]:
    """After parsing: drop the config's values tied to an argument the command line replaced (:data:`TIED_ARGS`)
    and return ``{argument: value}`` of every config value the run uses (the ones no flag overrode)."""
    for key, anchor in TIED_ARGS.items():
        if key in config.arguments and anchor in config.arguments and getattr(args, anchor) != config.arguments[anchor] \
                and getattr(args, key) == config.arguments[key]:
            setattr(args, key, plain[key])
    return {k: v for k, v in config.arguments.items() if getattr(args, k) == v}


def load_object(spec: str):
    """``"package.module:attribute"`` imported by name (a config's ``demo`` hooks)."""
    module, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute) if attribute else importlib.import_module(module)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"config hook {spec!r} cannot be imported ({err}); name an importable 'module:attribute'.") from None


def config_report(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """What a run says at start about its config: one line per value the config set (``args.config_values``), and
    the warnings (a warm-up longer than the run). Returns ``(info lines, warnings)``."""
    values = getattr(args, "config_values", None) or {}
    files = getattr(args, "config", None) or []
    lines = [f"config {', '.join(Path(f).name for f in files)}: --{k} = {json.dumps(v)}" for k, v in values.items()]
    warnings = []
    if args.lr_warmup_steps > args.max_train_steps:
        source = "the config's" if "lr_warmup_steps" in values else "the"
        warnings.append(f"{source} learning-rate warm-up (--lr_warmup_steps {args.lr_warmup_steps}) is longer than the "
                        f"run (--max_train_steps {args.max_train_steps}): the learning rate never reaches "
                        "--learning_rate. Lower --lr_warmup_steps, or raise --max_train_steps.")
    return lines, warnings
