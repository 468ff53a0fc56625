"""Derive the compact template store that ships as the default of `structure` and `discover`.

From the store of ../shared/data/structures/mp_union.csv.gz (53,164 MP structures with their prototype
labels; built under runs/ if missing), write every structure in the compact format (16-bit fixed-point
fractional coordinates, float32 lattices: 13.5 MB instead of 34 MB; see ``TemplateStore.save``), or with
``--per-type K`` at most K structures per prototype label (the lowest-E_hull one first, then the ones
farthest from those kept in the composition-descriptor space) plus every single-element structure.
Measured on MP-20 (benchmarks/csp.md, csp_compact.md): thinning costs top-1 accuracy (one per prototype
38.8 %, twenty per prototype 49.2 %, every structure 64.6 %), because the common prototypes need
chemically close templates, so the default keeps every structure. The store keeps each prototype's count
in the full store (a ranker feature). Writes ``structure/pretrained/templates-mp`` (store.json +
store.safetensors, with the attribution in its metadata).

    python scripts/make_default_templates.py [--per-type K] [--exclude-tag mp20_test -o runs/compact_no_test.db]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATTRIBUTION = ("Materials Project structures (c) Materials Project, CC BY 4.0 (A. Jain et al., APL Materials 1, "
               "011002 (2013)), from the MP-20, MPTS-52 and MP-40 benchmark splits as collected in "
               "../shared/data/structures/mp_union.csv.gz; representatives chosen by scripts/make_default_templates.py")


def select(store, per_type: int, rows: list[int]) -> tuple[list[int], int]:
    """(row numbers of the representatives among ``rows``, in store order; the number of types)."""
    groups: dict[tuple, list[int]] = {}
    for i in rows:
        groups.setdefault(store.prototypes[i], []).append(i)
    keep: set[int] = {i for i in rows if store.keys[i] == "1"}
    desc = np.asarray(store.descriptors, float)
    e = np.asarray(store.e_above_hull, float)
    for rows in groups.values():
        rows = sorted(rows, key=lambda i: (np.isnan(e[i]), e[i], i))
        chosen = [rows[0]]
        while len(chosen) < min(per_type, len(rows)):
            rest = [i for i in rows if i not in chosen]
            dist = [min(np.abs(desc[i] - desc[j]).sum() for j in chosen) for i in rest]
            chosen.append(rest[int(np.argmax(dist))])
        keep.update(chosen)
    return sorted(keep), len(groups)


def main() -> int:
    from structure.io import read_structures
    from structure.templates import TemplateStore

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--full", type=Path, default=ROOT / "runs" / "mp_union_v2.db", help="the full store (built if missing)")
    ap.add_argument("--per-type", type=int, default=None,
                    help="keep at most this many structures per prototype (default: every structure)")
    ap.add_argument("--exclude-tag", action="append", default=[], help="leave these split tags out (e.g. mp20_test)")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "structure" / "pretrained" / "templates-mp")
    args = ap.parse_args()
    t0 = time.time()
    if not (args.full / "store.json").is_file():
        TemplateStore.build(read_structures(args.shared / "data/structures/mp_union.csv.gz"),
                            source="mp_union.csv.gz", progress=False).save(args.full)
    full = TemplateStore.load(args.full)
    if args.exclude_tag:
        ok = [i for i in range(len(full)) if not any(t in full.tags[i].split(";") for t in args.exclude_tag)]
    else:
        ok = list(range(len(full)))
    if args.per_type is None:
        rows, n_types = ok, len({full.prototypes[i] for i in ok})
    else:
        rows, n_types = select(full, args.per_type, ok)
    compact = full.subset(rows)
    compact.prototype_counts = np.bincount(full.prototype_ids[ok], minlength=len(full))[full.prototype_ids[rows]]
    compact.meta.update({"source": ATTRIBUTION})
    compact.meta.update({"attribution": ATTRIBUTION, "per_type": args.per_type, "n_types": n_types,
                         "from_store_size": len(ok), "excluded_tags": args.exclude_tag})
    compact.save(args.output, compact=True)
    size = sum(p.stat().st_size for p in args.output.iterdir()) / 1e6
    print(f"{len(compact)} of {len(ok)} structures ({n_types} types, {len(compact.ratio_keys())} ratio keys) written "
          f"to {args.output} ({size:.1f} MB) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
