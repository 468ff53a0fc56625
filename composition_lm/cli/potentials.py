"""``composition-gen potentials``: the interatomic potentials the relaxing commands take by name, whether each is
installed, its energy scale and its measured calibration on WBM (``benchmarks/stability_wbm.md``)."""

from __future__ import annotations

import argparse


def cmd_potentials(args: argparse.Namespace) -> int:
    from structure.potentials import DEFAULT_JUDGES, DEFAULT_POTENTIAL, POTENTIALS, get_potential

    print(f"{'name':22} {'installed':10} {'energy scale':15} {'licence':13} published (Matbench Discovery, WBM)")
    for name, spec in POTENTIALS.items():
        installed = "yes" if spec.installed() else f"no: pip install 'composition-gen[{spec.extra}]'" if spec.extra \
            else f"no: pip install {spec.package}"
        mark = " (default)" if name == DEFAULT_POTENTIAL else " (judge)" if name in DEFAULT_JUDGES else ""
        print(f"{name + mark:22} {installed:10} {spec.energy_scale:15} {spec.licence:13} {spec.published}; "
              f"{spec.description}")
    if args.check:
        pot = get_potential(args.check)  # loads it: a missing extra or a bad folder fails here with the reason
        print(f"{args.check}: loaded {pot.name} ({pot.energy_scale}, correction {pot.correction})")
    print(f"Default: {DEFAULT_POTENTIAL} relaxes; stability and discover judge with {' + '.join(DEFAULT_JUDGES)} "
          "(single point) unless --potential or --judge is given. Any matgl model folder works too (--potential "
          "PATH). Measured on WBM: benchmarks/stability_wbm.md.")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("potentials", help="list the interatomic potentials --potential takes by name",
                       description="List the registered interatomic potentials (--potential NAME in stability, "
                       "discover, structure --relax, cdvae sample --relax and compare --relax): whether each is installed, the "
                       "energy scale it was trained on (mp-uncorrected gets MP2020 corrections, mp-corrected none) and "
                       "its licence. --check NAME|PATH loads one, as the relaxing commands would.")
    p.add_argument("--check", metavar="NAME|PATH", help="load this potential and report it")
    p.set_defaults(func=cmd_potentials)
