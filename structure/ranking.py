"""Ranking ratio-matched templates by learned composition similarity (CSPML-style).

CSPML (Kusaba et al. 2022) ranks the templates that share a query's stoichiometric ratios by a learned
probability that the two compositions crystallise in the same structure type. Here:

* **features** of a (query, template) pair: ``|d_query - d_template|`` of the composition descriptors
  of :mod:`structure.descriptors` (the ranker's ``properties``: the basic eight or all twenty), each
  divided by its spread over the store, and, with ``template_features``, what the composition alone
  cannot give about the template (:func:`template_features`): how often its prototype occurs in the
  store (in the source store, for a compact store of representatives) and its share of the ratio group, its number of Wyckoff sites and of atoms, its crystal system, its
  space group number and its energy above hull;
* **labels** (:func:`prototype_lists`): structures of the store serve as queries; a template is a
  positive when it has the query's prototype label (anonymised formula, space group, Wyckoff letters
  per element; :func:`structure.templates.prototype_label`), so every pair of a ratio group is labelled
  at no cost and tens of thousands of queries can be used. Each query's list holds its ``near``
  nearest templates by the plain distance (where ranking mistakes happen) and ``far`` random others
  from its ratio group (what the learned score may otherwise pull up unseen);
* **model**: the score of a pair is ``-alpha * plain_distance + MLP(features)``: a learned correction
  on top of the plain descriptor distance (the MLP's last layer starts at zero, so an untrained ranker
  ranks exactly like the plain distance). ``loss="listwise"`` trains it so that the softmax over a
  query's list puts its mass on the positives (``-log sum_{positives} softmax``: what top-1 ranking
  needs); ``loss="pairwise"`` is CSPML's own formulation, a binary classifier of "same structure type"
  on each pair (balanced binary cross-entropy);
* **checks** (in ``ranker.config.trained``): top-1 / top-10 on held-out queries next to the plain
  distance's, and, when the training excluded a set of prototypes (``holdout_prototypes``), the same
  on queries of those prototypes only: generalisation to structure types the ranker never saw;
* **storage**: ``ranker.safetensors`` (weights, feature scales) + ``ranker.json`` (config, metrics,
  how it was trained), beside the template store or anywhere else.

:func:`plain_distance_scores` is the untrained baseline: the L1 distance of the aligned electronegativity
/ row / group / atomic-radius features, each scaled by its spread. :func:`label_structure_types`
clusters structures into types with ``StructureMatcher`` (a utility for collections without labels).
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evaluation.io import atomic_path, shown_path, write_json
from structure.descriptors import (BASIC_PROPERTIES, DESCRIPTOR_VERSION, MAX_ELEMENTS, N_PROPS, PROPERTIES,
                                   property_columns)

DEFAULT_RANKER = Path(__file__).parent / "pretrained" / "ranker"  # shipped, trained on MP structures
MATCHER_KW = {"ltol": 0.3, "stol": 0.5, "angle_tol": 10}  # the tolerances predictions are scored with
PLAIN_PROPERTIES = ("electronegativity", "row", "group", "atomic_radius")
LOSSES = ("listwise", "pairwise")
CRYSTAL_SYSTEMS = (2, 15, 74, 142, 167, 194, 230)  # last space group number of each crystal system
N_TEMPLATE_FEATURES = 6 + len(CRYSTAL_SYSTEMS)


@dataclass
class RankerConfig:
    properties: list[str] = field(default_factory=lambda: list(PROPERTIES))  # descriptor properties used
    template_features: bool = True
    loss: str = "listwise"
    hidden: int = 128
    layers: int = 2
    descriptor_version: int = DESCRIPTOR_VERSION
    trained: dict = field(default_factory=dict)  # how it was trained and its held-out metrics

    def __post_init__(self) -> None:
        missing = set(PLAIN_PROPERTIES) - set(self.properties)
        if missing:
            raise ValueError(f"ranker properties must include the plain distance's {', '.join(PLAIN_PROPERTIES)}; "
                             f"missing {sorted(missing)}")
        property_columns(self.properties)  # unknown names raise
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    @property
    def n_inputs(self) -> int:
        return len(property_columns(self.properties)) + (N_TEMPLATE_FEATURES if self.template_features else 0)


def template_features(store) -> np.ndarray:
    """``[len(store), N_TEMPLATE_FEATURES]`` float32 template-side features (see the module docstring),
    computed once per store object."""
    cached = getattr(store, "_template_features", None)
    if cached is not None:
        return cached
    n = len(store)
    counts = store.prototype_counts.astype(np.float64)
    group_size = np.zeros(n)  # structures of the ratio group, counted as the prototype counts count them
    for rows in store._index.values():
        _, first = np.unique(store.prototype_ids[rows], return_index=True)
        group_size[rows] = counts[rows[first]].sum()
    atoms = np.diff(store.offsets).astype(np.float64)
    sg = np.asarray(store.spacegroups)
    system = np.zeros((n, len(CRYSTAL_SYSTEMS)))
    known = sg > 0
    system[np.flatnonzero(known), np.searchsorted(CRYSTAL_SYSTEMS, sg[known])] = 1.0
    e = np.asarray(store.e_above_hull, dtype=np.float64)
    feats = np.column_stack([np.log1p(counts), np.log(counts / group_size), np.log(np.maximum(store.n_wyckoff, 1)),
                             np.log(atoms), sg / 230.0, np.clip(np.nan_to_num(e, nan=0.5), 0, 1), system])
    store._template_features = feats.astype(np.float32)
    return store._template_features


class CompositionRanker(nn.Module):
    """Similarity of a (query, template) pair: the plain distance, scaled, plus a learned MLP correction
    on descriptor differences and template features (see the module docstring)."""

    def __init__(self, config: RankerConfig):
        super().__init__()
        self.config = config
        dims = [config.n_inputs] + [config.hidden] * config.layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.SiLU()]
        last = nn.Linear(dims[-1], 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*blocks, last)
        self.alpha = nn.Parameter(torch.ones(()))
        cols = property_columns(config.properties)
        self.register_buffer("columns", torch.from_numpy(cols))
        self.register_buffer("scale", torch.ones(len(cols)))
        self.register_buffer("feature_mean", torch.zeros(N_TEMPLATE_FEATURES))
        self.register_buffer("feature_std", torch.ones(N_TEMPLATE_FEATURES))
        plain_cols, weights = _plain_columns()
        plain = torch.zeros(len(cols))
        where = {int(c): i for i, c in enumerate(cols)}
        plain[torch.tensor([where[int(c)] for c in plain_cols])] = torch.from_numpy(weights).float()
        self.register_buffer("plain_weight", plain)

    def forward(self, diff: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (higher = more similar) of ``[..., C]`` absolute differences of the ranker's descriptor
        columns and, with template features, ``[..., N_TEMPLATE_FEATURES]`` raw template features."""
        x = diff / self.scale
        if self.config.template_features:
            x = torch.cat([x, (feats - self.feature_mean) / self.feature_std], dim=-1)
        return -self.alpha * (diff @ self.plain_weight) + self.net(x).squeeze(-1)

    @torch.no_grad()
    def scores(self, query: np.ndarray, templates: np.ndarray, feats: np.ndarray | None = None) -> np.ndarray:
        """Scores of one full query descriptor against ``[n, DESCRIPTOR_SIZE]`` template descriptors
        (and their ``[n, N_TEMPLATE_FEATURES]`` template features when the ranker uses them)."""
        self.eval()
        cols = self.columns.numpy()
        diff = torch.from_numpy(np.abs(templates[:, cols] - query[None, cols]).astype(np.float32))
        if self.config.template_features:
            if feats is None:
                raise ValueError("this ranker uses template features: pass template_features(store)[rows]")
            return self(diff, torch.from_numpy(np.asarray(feats, dtype=np.float32))).numpy()
        return self(diff).numpy()

    def rank(self, store, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Scores of ``rows`` of ``store`` for a query descriptor."""
        feats = template_features(store)[rows] if self.config.template_features else None
        return self.scores(query, store.descriptors[rows], feats)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "ranker.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        write_json(folder / "ranker.json", asdict(self.config))

    @classmethod
    def load(cls, folder: str | Path) -> CompositionRanker:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "ranker.json").is_file():
            raise FileNotFoundError(f"no ranker in {folder} (expected ranker.json and ranker.safetensors; train one "
                                    "with `composition-gen templates train-ranker`)")
        raw = json.loads((folder / "ranker.json").read_text())
        if raw.get("descriptor_version") != DESCRIPTOR_VERSION:
            raise ValueError(f"{folder}: ranker uses descriptor version {raw.get('descriptor_version')}, this code "
                             f"{DESCRIPTOR_VERSION}: retrain it with `composition-gen templates train-ranker`")
        model = cls(RankerConfig(**raw))
        model.load_state_dict(load_file(str(folder / "ranker.safetensors")))
        return model.eval()


def plain_distance_scores(query: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Negative scaled L1 distance of the aligned electronegativity, row, group and atomic radius (higher =
    more similar): the untrained baseline."""
    cols, weights = _plain_columns()
    return -(np.abs(templates[:, cols] - query[None, cols]) @ weights)


# -------------------------------------------------------------------------------------------- labels
def _matcher(**kw):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**(kw or MATCHER_KW), primitive_cell=True, scale=True, attempt_supercell=False)


def label_structure_types(structures: list, tolerances: dict | None = None) -> np.ndarray:
    """Cluster structures into structure types by anonymized ``StructureMatcher``: a type id per structure,
    0, 1, ... in order of first appearance (a structure joins the first type whose first member it
    matches). ``tolerances`` default to pymatgen's, stricter than ``MATCHER_KW`` (which e.g. lets rock
    salt match zinc blende)."""
    matcher = _matcher(**(tolerances or {"ltol": 0.2, "stol": 0.3, "angle_tol": 5}))
    reps: list = []  # the first member of each type
    labels = np.zeros(len(structures), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, s in enumerate(structures):
            labels[i] = next((t for t, rep in enumerate(reps) if matcher.fit_anonymous(rep, s)), len(reps))
            if labels[i] == len(reps):
                reps.append(s)
    return labels


def prototype_lists(store, queries=None, near: int = 64, far: int = 32, seed: int = 0,
                    exclude_prototypes: set[str] | frozenset = frozenset()) -> list[dict]:
    """Labelled lists ``{"query", "rows", "labels"}`` of store rows used as queries (``queries``, default
    every row whose ratio group holds another row): the ``near`` templates of its group nearest by the
    plain distance plus ``far`` random others, itself and templates of ``exclude_prototypes`` left out; a
    template is a positive when it shares the query's prototype label."""
    rng = np.random.default_rng(seed)
    protos = store.prototype_ids
    banned = np.array([p in exclude_prototypes for p in store.prototypes]) if exclude_prototypes else None
    if queries is None:
        queries = [i for i in range(len(store)) if len(store._index[store.keys[i]]) >= 2]
    out = []
    for q in queries:
        rows = store._index[store.keys[q]]
        rows = rows[rows != q]
        if banned is not None:
            rows = rows[~banned[rows]]
        if len(rows) == 0:
            continue
        order = np.argsort(-plain_distance_scores(store.descriptors[q], store.descriptors[rows]), kind="stable")
        head, rest = rows[order[:near]], rows[order[near:]]
        if len(rest) and far:
            head = np.concatenate([head, rng.choice(rest, size=min(far, len(rest)), replace=False)])
        out.append({"query": int(q), "rows": head, "labels": protos[head] == protos[q]})
    return out


# ------------------------------------------------------------------------------------------ training
def _hit_rates(store, lists: list[dict], score_fn, ks=(1, 10)) -> dict[int, float]:
    """Share of ``lists`` whose best-scored ``k`` rows hold a positive."""
    hits = {k: 0 for k in ks}
    for x in lists:
        order = np.argsort(-score_fn(x["query"], x["rows"]), kind="stable")
        for k in ks:
            hits[k] += bool(x["labels"][order[:k]].any())
    return {k: v / max(len(lists), 1) for k, v in hits.items()}


def _check(store, model: CompositionRanker, queries, prefix: str) -> dict:
    """Top-1 / top-10 of ``queries`` (store rows ranked against the rest of their ratio group, as in use;
    positives share the query's prototype) for the model and the plain distance, and the share of
    queries with any positive (the ceiling)."""
    full = []
    for q in queries:
        rows = store._index[store.keys[q]]
        rows = rows[rows != q]
        full.append({"query": int(q), "rows": rows, "labels": store.prototype_ids[rows] == store.prototype_ids[q]})
    learned = _hit_rates(store, full, lambda q, rows: model.rank(store, store.descriptors[q], rows))
    plain = _hit_rates(store, full, lambda q, rows: plain_distance_scores(store.descriptors[q], store.descriptors[rows]))
    return {f"{prefix}_n": len(full), f"{prefix}_top1": learned[1], f"{prefix}_top10": learned[10],
            f"{prefix}_top1_plain_distance": plain[1], f"{prefix}_top10_plain_distance": plain[10],
            f"{prefix}_ceiling": float(np.mean([x["labels"].any() for x in full])) if full else None}


def _batch_loss(model: CompositionRanker, diffs, feats, labels, lengths, loss: str) -> torch.Tensor:
    scores = model(diffs, feats)
    if loss == "pairwise":  # CSPML: "same structure type?" as a balanced binary classifier
        pos = labels.float()
        w = torch.where(labels, 0.5 / pos.sum().clamp(min=1), 0.5 / (1 - pos).sum().clamp(min=1))
        return (w * nn.functional.binary_cross_entropy_with_logits(scores, pos, reduction="none")).sum()
    out = []
    for s, y in zip(scores.split(lengths), labels.split(lengths)):
        out.append(torch.logsumexp(s, 0) - torch.logsumexp(s.masked_fill(~y, -torch.inf), 0))
    return torch.stack(out).mean()


def train_ranker(store, config: RankerConfig | None = None, seed: int = 0, epochs: int = 10, lr: float = 1e-3,
                 lists_per_step: int = 64, heldout_fraction: float = 0.1, n_queries: int | None = None,
                 near: int = 64, far: int = 32, holdout_prototypes: set[str] | frozenset = frozenset(),
                 progress: bool = False) -> CompositionRanker:
    """Train a :class:`CompositionRanker` on prototype-labelled lists of ``store`` (:func:`prototype_lists`).

    Queries: every store row whose ratio group holds another row (at most ``n_queries`` of them, drawn
    with ``seed``); ``heldout_fraction`` of them are held out and checked. Structures whose prototype is
    in ``holdout_prototypes`` are neither queries nor templates in training; the queries among them are
    checked apart (``trained["heldout_prototypes_*"]``). Only lists with both a positive and a negative
    train. Metrics go into ``ranker.config.trained``."""
    from tqdm.auto import tqdm

    t0 = time.time()
    config = config or RankerConfig()
    rng = np.random.default_rng(seed)
    eligible = np.array([i for i in range(len(store)) if len(store._index[store.keys[i]]) >= 2], dtype=np.int64)
    in_holdout = np.array([store.prototypes[i] in holdout_prototypes for i in eligible], dtype=bool)
    proto_queries, pool = eligible[in_holdout], rng.permutation(eligible[~in_holdout])
    if n_queries is not None:
        pool = pool[:n_queries]
    n_held = int(round(heldout_fraction * len(pool))) if len(pool) > 1 else 0
    held, train_q = pool[:n_held], pool[n_held:]
    lists = prototype_lists(store, train_q, near, far, seed, frozenset(holdout_prototypes))
    usable = [x for x in lists if 0 < x["labels"].sum() < len(x["labels"])]
    if not usable:
        raise ValueError("no training query has both a template of its prototype and one of another in its ratio "
                         "group; use a larger store")
    torch.manual_seed(seed)
    model = CompositionRanker(config)
    cols = model.columns.numpy()
    desc = store.descriptors[:, cols]
    model.scale.copy_(torch.from_numpy(np.maximum(desc.std(0), 1e-6).astype(np.float32)))
    feats_all = template_features(store)
    model.feature_mean.copy_(torch.from_numpy(feats_all.mean(0)))
    model.feature_std.copy_(torch.from_numpy(np.maximum(feats_all.std(0), 1e-6)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(usable) + lists_per_step - 1) // lists_per_step)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(total=steps, desc="training ranker", unit="step", disable=not progress)
    for _ in range(epochs):
        for batch in torch.randperm(len(usable), generator=g).split(lists_per_step):
            xs = [usable[int(k)] for k in batch]
            rows = np.concatenate([x["rows"] for x in xs])
            qs = np.concatenate([np.full(len(x["rows"]), x["query"]) for x in xs])
            diffs = torch.from_numpy(np.abs(desc[rows] - desc[qs]))
            feats = torch.from_numpy(feats_all[rows])
            labels = torch.from_numpy(np.concatenate([x["labels"] for x in xs]))
            loss = _batch_loss(model, diffs, feats, labels, [len(x["rows"]) for x in xs], config.loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    model.eval()
    trained = {"seed": seed, "epochs": epochs, "lr": lr, "labels": "same prototype label (structure.templates."
               "prototype_label)", "near": near, "far": far, "n_queries_train": len(train_q),
               "n_lists_used": len(usable), "n_pairs": int(sum(len(x["rows"]) for x in usable)),
               "store": shown_path(store.path) if store.path else store.meta.get("source", ""),
               "store_size": len(store),
               "n_holdout_prototypes": len(holdout_prototypes), "alpha": float(model.alpha.detach())}
    if len(held):
        trained.update(_check(store, model, held, "heldout"))
    if len(proto_queries):
        trained.update(_check(store, model, proto_queries, "heldout_prototypes"))
    trained["seconds"] = time.time() - t0
    model.config.trained = trained
    return model


def prototype_folds(store, folds: int = 5, fold: int = 0) -> frozenset[str]:
    """The prototype labels of ``store`` in fold ``fold`` of ``folds`` (by a stable hash of the label): the
    structure types a prototype-held-out check leaves out of training."""
    import zlib

    return frozenset(p for p in set(store.prototypes) if zlib.crc32(p.encode()) % folds == fold)


@functools.cache
def _plain_columns() -> tuple[np.ndarray, np.ndarray]:
    """Columns of the aligned electronegativity, row, group and atomic radius in the descriptor, and the
    weight of each (1 / the property's spread over the table): the plain distance."""
    from structure.descriptors import property_scale

    pick = [PROPERTIES.index(p) for p in PLAIN_PROPERTIES]
    cols = np.array([slot * N_PROPS + p for slot in range(MAX_ELEMENTS) for p in pick])
    return cols, np.tile(1 / property_scale()[pick], MAX_ELEMENTS)


BASIC = list(BASIC_PROPERTIES)  # the descriptor of the first ranker: pymatgen's eight properties
