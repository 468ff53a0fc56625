"""Typed settings objects: one dataclass per set of settings, whose fields carry their help text and their range.

A settings class (a dataclass deriving from :class:`Settings`) is the one definition of a group of settings:

* constructing it checks every field (range, choices), so a bad value fails in Python as on the command line;
* :meth:`Settings.replace` overrides some fields and rejects names it does not know;
* :meth:`Settings.save` / :meth:`Settings.load` write and read it as JSON (YAML is read too), so it travels with a
  model (``sampling_config.json`` beside ``config.json``) and with a run (``run_config.json``);
* ``composition_lm.cli.options.add_settings_arguments`` turns its fields into command-line options, so a new
  setting is one field here and nothing else.

Fields are declared with :func:`setting`. It lives in the bottom layer because both generators (the formula models
in ``composition_lm`` and CDVAE in ``structure``) describe their samplers this way. No heavy import here: building
``--help`` reads these classes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

__all__ = ["RANGES", "SAMPLING_CONFIG_NAME", "Settings", "comma_list", "setting"]

#: the file beside a model's ``config.json`` that holds its sampling defaults (formula models and CDVAE alike)
SAMPLING_CONFIG_NAME = "sampling_config.json"

#: named numeric ranges: (type, test, what a value must be); the command line checks them while parsing
RANGES = {
    "positive_int": (int, lambda v: v >= 1, "an integer >= 1"),
    "non_negative_int": (int, lambda v: v >= 0, "an integer >= 0"),
    "positive_float": (float, lambda v: 0 < v < math.inf, "a number > 0"),
    "non_negative_float": (float, lambda v: 0 <= v < math.inf, "a number >= 0"),
    "unit_interval": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "fraction": (float, lambda v: 0 < v < 1, "in (0, 1)"),
    "probability": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "half_open_unit": (float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "any_float": (float, lambda v: math.isfinite(v), "a finite number"),
    "tolerance": (float, lambda v: 0 <= v < math.inf, "a tolerance >= 0"),
    "angle_tolerance": (float, lambda v: 0 <= v <= 15, "between 0 and 15 degrees"),
}


def comma_list(text: str) -> list[str]:
    """``"Li, Fe,O"`` -> ``["Li", "Fe", "O"]`` (empty items dropped): a list field written on one line."""
    return [s.strip() for s in text.split(",") if s.strip()]


def setting(default=dataclasses.MISSING, help: str = "", *, range: str | None = None, choices=None,
            flag: str | None = None, action: str | None = None, metavar: str | None = None, group: str = "",
            default_factory=dataclasses.MISSING, cli: bool = True, nullable: bool = False):
    """A dataclass field with what the command line and the checks need.

    ``range``: a key of :data:`RANGES`; ``choices``: allowed values (None is always allowed when the default is
    None); ``flag``: the option's name when it is not ``--field-name``; ``action``: ``store_false`` /
    ``store_true`` (a switch that sets the field), ``optional`` (``--x/--no-x``), ``list`` (comma-separated
    values, e.g. ``Li,Fe,O``) or ``append`` (a repeatable option); ``group``: lets a command take a subset;
    ``cli=False``: a setting kept out of the command line; ``nullable``: None is allowed although the default is
    not (a field whose default is None always allows it)."""
    meta = {"help": help, "range": range, "choices": None if choices is None else tuple(choices), "flag": flag,
            "action": action, "metavar": metavar, "group": group, "cli": cli, "nullable": nullable}
    if range is not None and range not in RANGES:
        raise ValueError(f"unknown range {range!r}")
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


class Settings:
    """Mixin of a settings dataclass: checks on construction, ``replace``, JSON/YAML round trip."""

    #: what the settings are called in messages ("sampling setting", ...)
    kind = "setting"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            self._check(f, getattr(self, f.name))

    def _check(self, f: dataclasses.Field, value) -> None:
        """A ValueError that names the setting as the command line does (``top p must be in (0, 1], got 2``)."""
        meta, name = f.metadata, f.name.replace("_", " ")
        if value is None:
            if _field_default(f) is not None and not meta.get("nullable"):
                raise ValueError(f"{name} may not be None")
            return
        if meta.get("choices") is not None and value not in meta["choices"]:
            shown = ", ".join("none" if c is None else str(c) for c in meta["choices"])
            raise ValueError(f"{name} must be one of {shown}, got {value!r}")
        if meta.get("range"):
            kind, test, what = RANGES[meta["range"]]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ValueError(f"{name} must be {what}, got {value!r}")
            if not test(value):
                raise ValueError(f"{name} must be {what}, got {value}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **overrides):
        """A copy with ``overrides``; an unknown name is a ValueError that lists the known ones."""
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown {self.kind}{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                             f"known: {', '.join(self.names())}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict, strict: bool = True):
        """An instance from a dict of field values (missing ones take their defaults); with ``strict`` an unknown
        key is an error, else it is ignored (a run's config also records what it measured)."""
        known = set(cls.names())
        unknown = sorted(set(data) - known)
        if strict and unknown:
            raise ValueError(f"unknown {cls.kind}{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> Path:
        """Write the settings as JSON (atomically)."""
        from evaluation.io import write_json

        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, strict: bool = True):
        """Read settings written by :meth:`save`, or any JSON / YAML file of field values
        (:func:`read_settings_file`)."""
        return cls.from_dict(read_settings_file(path), strict=strict)


def read_settings_file(path: str | Path) -> dict:
    """The mapping in a JSON or YAML file (by suffix: ``.yaml``/``.yml`` is YAML, anything else JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no settings file at {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a mapping of settings")
    return data


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    return value
