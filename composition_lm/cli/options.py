"""What several commands share: checked numeric option types, the relaxation options, the command line as
typed, corpus specs (``PATH@SPLIT``) and dataclass-driven argument mapping."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

PROTOCOL_CHOICES = ("cdvae", "smact", "both")
DEFAULT_POTENTIAL = "chgnet"  # structure.potentials.DEFAULT_POTENTIAL (kept import-free for --help; a test checks)
DEFAULT_JUDGES = ("sevennet-l3i5",)  # structure.potentials.DEFAULT_JUDGES
POTENTIAL_NAMES = ("chgnet", "sevennet-0", "sevennet-l3i5", "nequix-mp-1", "m3gnet")  # structure.potentials.POTENTIALS
# structure.stability.DEFAULT_STOP_MARGIN, DEFAULT_JUDGE_MARGIN, DEFAULT_STOP_AFTER, DEFAULT_SKIP_ABOVE,
# DEFAULT_DISCOVER_MAX_STEPS (a test checks)
DEFAULT_STOP_MARGIN, DEFAULT_JUDGE_MARGIN, DEFAULT_STOP_AFTER = 0.5, 0.2, 50
DEFAULT_SKIP_ABOVE, DEFAULT_DISCOVER_MAX_STEPS = 0.15, 200


# ------------------------------------------------------------------------------------ numeric types
class OptionError(ValueError):
    """A numeric option outside its range; :func:`composition_lm.cli.main` reports it and returns 2."""


class _Checked(argparse.Action):
    """Stores a converted value after checking its range while the command line is parsed, so that a bad
    number ends in one clear line and exit code 2 before any work, not in a traceback later."""

    def __init__(self, option_strings, dest, check=None, what: str = "", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.check, self.what = check, what

    def __call__(self, parser, namespace, values, option_string=None):
        if not self.check(values):
            raise OptionError(f"argument {option_string}: {self.dest.replace('_', ' ')} must be {self.what}, "
                              f"got {values}")
        setattr(namespace, self.dest, values)


def _checked(kind, check, what: str) -> dict:
    """``add_argument`` keywords for a number converted by ``kind`` and accepted when ``check(value)``
    (NaN fails every range)."""
    return {"type": kind, "action": _Checked, "check": check, "what": what}


positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a number > 0")
non_negative_float = _checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")
fraction = _checked(float, lambda v: 0 < v < 1, "in (0, 1)")
probability = _checked(float, lambda v: 0 < v <= 1, "in (0, 1]")
half_open_unit = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")


def number_or_off(text: str) -> float | None:
    """A number, or None for ``off``/``none``."""
    return None if text.strip().lower() in ("off", "none") else float(text)


#: a number >= 0, or ``off`` (None): a bound that can be switched off
bound_or_off = _checked(number_or_off, lambda v: v is None or 0 <= v < float("inf"), "a number >= 0 or 'off'")


# --------------------------------------------------------------------------------- shared options
def add_relax_arguments(p: argparse.ArgumentParser, relax_by_default: bool = False, max_steps: int = 500) -> None:
    """The relaxation options of ``structure``, ``cdvae sample``, ``compare`` (off unless ``--relax``) and
    ``stability`` / ``discover`` / ``learn`` (on unless ``--no-relax``); ``max_steps``: the command's default step
    cap (``discover``'s is lower: benchmarks/funnel_speed.md)."""
    if relax_by_default:
        p.add_argument("--relax", action=argparse.BooleanOptionalAction, default=True,
                       help="relax every structure first (FIRE, cell + positions), or take its energy as given "
                       "(--no-relax) (default: relax)")
    else:
        p.add_argument("--relax", action="store_true",
                       help="relax every structure with an interatomic potential (FIRE, cell + positions)")
    p.add_argument("--potential", default=None, metavar="NAME|PATH",
                   help=f"interatomic potential: {', '.join(POTENTIAL_NAMES)} (m3gnet loads from matgl's cache or hub, "
                   "so offline pass its folder, e.g. ../shared/models/matgl/M3GNet-MP-2021.2.8-PES), or a matgl model "
                   "folder; `composition-gen potentials` lists them (default: "
                   f"{DEFAULT_POTENTIAL}, installed with the package; stability and discover then judge its relaxed "
                   f"structures with a single point of {' + '.join(DEFAULT_JUDGES)}, the scheme that measured best on "
                   "WBM within the cost budget: benchmarks/stability_wbm.md)")
    p.add_argument("--fmax", **positive_float, default=0.05, help="force threshold in eV/Å (default: 0.05)")
    p.add_argument("--max-steps", **positive_int, default=max_steps,
                   help=f"optimizer steps per structure (default: {max_steps})")
    p.add_argument("--optimizer", type=str.upper, choices=("FIRE", "LBFGS", "BFGS"), default="FIRE",
                   help="ASE optimizer: FIRE as matgl's Relaxer, or LBFGS (same minima in fewer force calls; "
                   "see benchmarks/relax.md) (default: FIRE)")
    p.add_argument("--relax-batch-size", **positive_int, default=1,
                   help="structures per batched forward pass in each process (matgl models; other potentials "
                   "evaluate one structure at a time): 1.3x faster on near-minimum structures on one CPU core with "
                   "M3GNet, no gain on far-from-minimum ones (benchmarks/relax.md) (default: 1)")
    p.add_argument("--relax-time-limit", **positive_float, default=600, metavar="SECONDS",
                   help="wall-clock seconds one structure may take; one still relaxing then stops as not converged, "
                   "with its last geometry, so a single pathological structure cannot hold up a run (default: 600)")
    p.add_argument("--workers", **positive_int, default=1, help="relaxation worker processes (default: 1)")
    p.add_argument("--references", type=Path, metavar="DB",
                   help="template store whose single-element structures are checked against the shipped MP elemental "
                   "ground states, which give the reference energies of formation energies (default: the "
                   "--templates store, else the shipped compact MP store)")


def add_correction_argument(p) -> None:
    """``--judge`` and ``--correction`` of the commands that give E_hull (``stability``, ``discover``,
    ``compare --relax``)."""
    p.add_argument("--judge", action="append", metavar="NAME|PATH",
                   help="score the relaxed structure with this potential's single point instead of the relaxing "
                   "potential's energy (two-stage: relax cheaply, judge with a stronger model); repeat for a "
                   "committee: "
                   "E_hull is the judges' mean and e_hull_std their spread (default: the --potential alone)")
    p.add_argument("--correction", choices=["auto", "mp2020", "none"], default="auto",
                   help="energy scale: auto: what the potential needs (MP2020 corrections for one trained on MP's "
                   "uncorrected energies: m3gnet, sevennet-*; none for chgnet, whose training energies carry them); "
                   "mp2020 / none force the choice (default: auto; benchmarks/stability_wbm.md)")


def check_potentials(args: argparse.Namespace) -> None:
    """Load ``--potential`` and every ``--judge`` first: a bad name or folder fails in seconds, before any other
    input is read or anything sampled."""
    from structure.potentials import get_potential

    for name in [args.potential, *(args.judge or [])]:
        get_potential(name)


def quiet_console() -> None:
    """Keep the progress bars readable: scipy's ``logm result may be inaccurate`` (from pymatgen's cell filter
    maths, once per step), matplotlib's font messages and its "Ignoring fixed y limits to fulfill fixed data
    aspect" (a logged warning, from the hull diagrams) say nothing a user can act on."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="logm result may be inaccurate")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="scipy")
    logging.getLogger("matplotlib").setLevel(logging.ERROR)


def relax_settings(args: argparse.Namespace):
    """The :class:`structure.relax.RelaxSettings` of the relaxation options."""
    from structure.relax import RelaxSettings

    return RelaxSettings(fmax=args.fmax, max_steps=args.max_steps, optimizer=args.optimizer,
                         batch_size=args.relax_batch_size, time_limit=args.relax_time_limit)


def add_settings_arguments(p: argparse.ArgumentParser, cls, groups: tuple[str, ...] | None = None,
                           suppress: bool = True) -> None:
    """One option per field of the settings dataclass ``cls`` (:mod:`evaluation.settings`), or of the fields in
    ``groups``: name, help, range check and choices all come from the field, so a new setting is one field.
    With ``suppress`` an option that is not given leaves no attribute, so the defaults can come from elsewhere
    (the model's saved settings, ``--config FILE``: :func:`settings_from_args`); else it defaults to the field's
    default."""
    from evaluation.settings import RANGES, comma_list

    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or (groups is not None and meta.get("group") not in groups):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        help_text = meta.get("help", "")
        if "(default" not in help_text and meta.get("action") not in ("store_false", "store_true"):
            help_text += f" (default: {'none' if default is None else default})"
        kw = {"dest": f.name, "help": help_text, "default": argparse.SUPPRESS if suppress else default}
        action = meta.get("action")
        if action in ("store_false", "store_true"):
            kw["action"] = action
        elif action == "optional":
            kw["action"] = argparse.BooleanOptionalAction
        elif action == "list":
            kw["type"] = comma_list
        elif action == "append":
            kw["action"] = "append"
        if meta.get("range"):
            kind, test, what = RANGES[meta["range"]]
            kw.update(_checked(kind, test, what))
        if meta.get("choices") is not None:
            shown = ["none" if c is None else c for c in meta["choices"]]
            kw["choices"] = shown
            if None in meta["choices"]:
                kw["metavar"] = "{" + ",".join(shown) + "}"
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        p.add_argument(flag, **kw)


def settings_from_args(args: argparse.Namespace, base, groups: tuple[str, ...] | None = None,
                       file_values: dict | None = None):
    """``base`` (a settings object) with ``file_values`` (what ``--config FILE`` holds, read once by the command:
    :func:`config_file_values`) and, over them, the options given on the command line (those that
    :func:`add_settings_arguments` left in ``args``, of ``groups`` when given, as they were added)."""
    if file_values:
        base = base.replace(**{k: v for k, v in file_values.items() if k in base.names()})
    names = [f.name for f in dataclasses.fields(base)
             if groups is None or f.metadata.get("group") in groups]
    return base.replace(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def config_file_values(args: argparse.Namespace) -> dict:
    """The mapping in ``--config FILE`` (JSON or YAML), read once; ``{}`` without the option."""
    if getattr(args, "config", None) is None:
        return {}
    from evaluation.settings import read_settings_file

    return read_settings_file(args.config)


def run_value(args: argparse.Namespace, name: str, default, file_values: dict):
    """A run option (``n``, ``seed``, ``model``) that may also come from ``--config FILE`` (``file_values``): the
    command line's value, else the file's, else ``default``."""
    if getattr(args, name, None) is not None:
        return getattr(args, name)
    value = file_values.get(name)
    return default if value is None else value


def model_for(args: argparse.Namespace) -> str | None:
    """``--model``, else the shipped property-conditioned model when ``--target`` is given (a user asking for
    a property need not know which shipped model can answer), else None (the default model)."""
    from composition_lm.models import CONDITIONAL_MODEL

    return args.model or (CONDITIONAL_MODEL if getattr(args, "targets", None) else None)


def relaxer(args: argparse.Namespace, references=None):
    """The :class:`structure.Relaxer` of the relaxation options (None without ``--relax``), built before any
    other work so that a bad potential fails at once. Elemental references: the shipped ground states, checked
    against ``--references``, else ``references`` (a store or folder), else the shipped compact MP store, cached
    beside a store of the user's or in the output folder."""
    if not args.relax:
        return None
    from structure import Relaxer

    return Relaxer(args.potential, settings=relax_settings(args),
                   references=args.references if args.references is not None else references, cache_dir=args.output)


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------ small helpers
def command_line(args: argparse.Namespace) -> str:
    """The command as typed, recorded in run configs and model cards."""
    argv = getattr(args, "_argv", None)
    return "composition-gen " + shlex.join(sys.argv[1:] if argv is None else argv)


def protocols(choice: str) -> tuple[str, ...]:
    from evaluation.validity import protocols_of

    return protocols_of(choice)


def split_spec(spec: str) -> tuple[str, str | None]:
    """``PATH@SPLIT`` -> (PATH, SPLIT); a path that exists as written is taken whole."""
    if "@" in spec and not Path(spec).exists():
        path, split = spec.rsplit("@", 1)
        return path, split
    return spec, None


def load_spec(spec: str, column: str | None = None) -> tuple[str, list[str]]:
    """(a short name, the distinct formulas) of a corpus given as ``PATH`` or ``PATH@SPLIT``."""
    from composition_lm.data import load_corpus

    path, split = split_spec(spec)
    ds, report = load_corpus(path, column=column, split=split, dedupe=True)
    name = Path(path).name.split(".")[0] + (f"@{split}" if split else "")
    print(f"  {name}: {report.n_kept} distinct formulas", file=sys.stderr)
    return name, ds["formula"]


def field_default(cls, name: str):
    """The default of dataclass ``cls``'s field ``name`` (parser defaults come from the one definition)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def dataclass_arguments(cls, args: argparse.Namespace, **overrides):
    """An instance of the argument dataclass ``cls`` from the parsed options named like its fields,
    ``progress`` from ``--no-progress``, then ``overrides``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    if "progress" in {f.name for f in dataclasses.fields(cls)} and hasattr(args, "no_progress"):
        values["progress"] = not args.no_progress
    values.update(overrides)
    return cls(**values)
