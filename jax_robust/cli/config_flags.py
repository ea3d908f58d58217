"""The binaries' flags, defined from the config dataclasses' own metadata (config.setting) and
the method registry's hyperparameters, so a setting is declared once: `run` and `sweep` take
the same flags, with the same names, defaults and help, and the README's flag table is
generated from them (`python -m jax_robust.cli.flag_table`)."""

from __future__ import annotations

import dataclasses
import types
import typing

from absl import flags

from jax_robust import config as cfglib
from jax_robust import methods
from jax_robust.errors import UserError

FLAGS = flags.FLAGS


def flag_name(dotted: str, field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or dotted.rpartition(".")[2]


def _base_type(cls, name: str):
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
        args = list(typing.get_args(hint))
    return typing.get_origin(hint) or hint, args


def _section_class(dotted: str):
    section = dotted.partition(".")[0]
    return cfglib.SECTIONS.get(section, cfglib.RunConfig) if "." in dotted else cfglib.RunConfig


def _hparam_flags() -> dict[str, tuple[methods.HParam, str]]:
    """flag name -> (a HParam of that name, its help over every method that has it)."""
    seen: dict[str, list[tuple[str, methods.HParam]]] = {}
    for method in methods.METHODS.values():
        for h in method.hparams:
            seen.setdefault(h.name, []).append((method.name, h))
    out = {}
    for name, owners in seen.items():
        h = owners[0][1]
        defaults = ", ".join(f"{m} {p.default:g}" for m, p in owners)
        out[name] = (h, f"{h.help} (default: {defaults})")
    return out


def define_config_flags(exclude: tuple[str, ...] = ()) -> list[str]:
    """Defines one flag per config setting (and per method hyperparameter) not in `exclude`
    (dotted setting names, 'train.hparams' for the hyperparameter flags); returns the flag
    names in order."""
    names = []
    for dotted, field in cfglib.settings():
        if dotted in exclude:
            continue
        if dotted == "train.hparams":
            for name, (h, help_text) in _hparam_flags().items():
                define = flags.DEFINE_integer if h.integer else flags.DEFINE_float
                define(name, None, help_text)
                names.append(name)
            continue
        name = flag_name(dotted, field)
        kind, args = _base_type(_section_class(dotted), dotted.rpartition(".")[2])
        default, help_text = field.default, field.metadata["help"]
        if kind is tuple:
            flags.DEFINE_list(name, None if default is None else [str(v) for v in default],
                              help_text)
        elif kind is bool:
            flags.DEFINE_bool(name, default, help_text)
        elif kind is int:
            flags.DEFINE_integer(name, default, help_text)
        elif kind is float:
            flags.DEFINE_float(name, default, help_text)
        else:
            flags.DEFINE_string(name, default, help_text)
        names.append(name)
    return names


def _list_value(dotted: str, values: list[str] | None):
    if values is None:
        return None
    _, args = _base_type(_section_class(dotted), dotted.rpartition(".")[2])
    item = args[0] if args else str
    try:
        return tuple(item(v) for v in values if v != "")
    except ValueError:
        raise UserError(f"--{flag_name(dotted, dict(cfglib.settings())[dotted])} must be a "
                        f"list of {item.__name__}s, got {values}") from None


def config_from_flags(exclude: tuple[str, ...] = ()) -> cfglib.RunConfig:
    """The RunConfig of the parsed flags (settings in `exclude` keep their defaults)."""
    sections: dict[str, dict] = {name: {} for name in cfglib.SECTIONS}
    top = {}
    for dotted, field in cfglib.settings():
        if dotted in exclude:
            continue
        section, _, key = dotted.rpartition(".")
        if dotted == "train.hparams":
            value = tuple(sorted((name, FLAGS[name].value) for name in _hparam_flags()
                                 if FLAGS[name].value is not None))
        else:
            value = FLAGS[flag_name(dotted, field)].value
            if isinstance(value, list):
                value = _list_value(dotted, value)
        (sections[section] if section else top)[key] = value
    return cfglib.RunConfig(**{k: cfglib.SECTIONS[k](**v) for k, v in sections.items()}, **top)
