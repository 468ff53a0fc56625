"""Set a CDVAE model's sampling defaults (config.json, rewritten in place through a temporary file):
the composition sampler, its temperature and validity redraws, the Langevin type update, the volume
weight (the sampled cell scaled toward its composition's volume) and the rounds of decoding again a crystal
whose final composition is invalid (or whose number of elements or stoichiometry pattern is rare in training),
the atom-count sampler, the latent temperature, the angle snapping and the symmetrization tolerance, as chosen by
measurement in benchmarks/cdvae_levers.md. The weights are untouched; every default can still be overridden per
call (`cdvae sample --composition ... --type-update ...`).

Run: python scripts/set_cdvae_sampler.py MODEL_DIR --composition k-first --temperature 1 --retries 20 \
         --type-update fixed [--volume-weight 0.75] [--resample-invalid 5 [--min-element-share 0.01] \
         [--min-pattern-share 0.01]] [--natom-sampler sample] [--latent-temperature 0.9] [--snap-angles 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.io import write_json  # noqa: E402
from structure.cdvae.model import (  # noqa: E402
    CDVAEConfig,
    check_latent_temperature,
    check_min_share,
    check_share_tables,
    check_snap_angles,
    check_symmetrize_tolerance,
    check_volume_weight,
)
from structure.cdvae.sampling import COMPOSITION_SAMPLERS, NATOM_SAMPLERS, TYPE_UPDATES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--composition", choices=COMPOSITION_SAMPLERS, required=True)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--retries", type=int, default=0)
    ap.add_argument("--type-update", choices=TYPE_UPDATES, required=True)
    ap.add_argument("--volume-weight", type=float, help="(default: leave the model's as it is)")
    ap.add_argument("--resample-invalid", type=int, help="(default: leave the model's as it is)")
    ap.add_argument("--latent-temperature", type=float, help="(default: leave the model's as it is)")
    ap.add_argument("--symmetrize", type=float, help="(default: leave the model's as it is)")
    ap.add_argument("--snap-angles", type=float, help="(default: leave the model's as it is)")
    ap.add_argument("--min-element-share", type=float, help="(default: leave the model's as it is)")
    ap.add_argument("--min-pattern-share", type=float, help="(default: leave the model's as it is)")
    ap.add_argument("--natom-sampler", choices=NATOM_SAMPLERS, help="(default: leave the model's as it is)")
    args = ap.parse_args()
    path = args.model / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(composition_sampler=args.composition, composition_temperature=args.temperature,
               composition_retries=args.retries, type_update=args.type_update)
    if args.volume_weight is not None:
        cfg["volume_weight"] = args.volume_weight
    if args.resample_invalid is not None:
        if args.resample_invalid < 0:
            raise SystemExit("--resample-invalid must be 0 or more")
        cfg["resample_invalid"] = args.resample_invalid
    checks = {"latent_temperature": check_latent_temperature, "symmetrize": check_symmetrize_tolerance,
              "min_element_share": lambda v: check_min_share(v, "min_element_share"),
              "min_pattern_share": lambda v: check_min_share(v, "min_pattern_share"), "snap_angles": check_snap_angles}
    for key, check in checks.items():
        value = getattr(args, key)
        if value is not None:
            try:
                cfg[key] = check(value)
            except ValueError as e:
                raise SystemExit(str(e)) from None
    if args.natom_sampler is not None:
        cfg["natom_sampler"] = args.natom_sampler
    config = CDVAEConfig.from_dict({k: v for k, v in cfg.items() if k != "model_type"})  # still a valid config
    check_volume_weight(config.volume_weight, config.atomic_volumes)
    try:
        check_share_tables(config.element_counts, config.min_element_share, config.stoichiometry_counts,
                           config.min_pattern_share)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    write_json(path, cfg)
    print(f"{path}: {args.composition} (T={args.temperature:g}, {args.retries} redraws), "
          f"type update {args.type_update}, volume weight {cfg.get('volume_weight', 0.0):g}, "
          f"{cfg.get('resample_invalid', 0)} rounds of resampling invalid crystals "
          f"(element-count share below {cfg.get('min_element_share', 0.0):g} and stoichiometry-pattern share below "
          f"{cfg.get('min_pattern_share', 0.0):g} counted invalid), "
          f"atom counts by {cfg.get('natom_sampler', 'argmax')}, "
          f"latent temperature {cfg.get('latent_temperature', 1.0):g}, "
          f"angles snapped within {cfg.get('snap_angles', 0.0):g}°, symmetrized at {cfg.get('symmetrize', 0.0):g} Å")


if __name__ == "__main__":
    main()
