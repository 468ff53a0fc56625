"""Ranking ratio-matched templates by learned composition similarity (CSPML-style).

CSPML (Kusaba et al. 2022) ranks the templates that share a query's stoichiometric ratios by a learned
probability that the two compositions crystallise in the same structure type. Here:

* **features** of a (query, template) pair: ``|d_query - d_template|`` of the composition descriptors
  of :mod:`structure.descriptors`, divided by each feature's spread over the store;
* **labels** (:func:`labelled_shortlists`): structures of the store serve as queries; each query's
  shortlist is the ``shortlist`` templates of its ratio group nearest by the plain distance (itself
  excluded), and a template is a positive when pymatgen's ``StructureMatcher`` matches it to the query
  on anonymized species, with the tolerances used to score predictions (``MATCHER_KW``). Shortlists
  put the training signal where ranking mistakes happen: among templates that are already close;
* **model**: the score of a pair is ``-alpha * plain_distance + MLP(|d_q - d_t| / scale)``: a learned
  correction on top of the plain descriptor distance (the MLP's last layer starts at zero, so an
  untrained ranker ranks exactly like the plain distance). It is trained with a *listwise* loss: the
  softmax over a query's shortlist should put its mass on the positives (``-log sum_{positives}
  softmax``), which is what top-1 ranking needs. A fraction of the queries is held out and measured
  (top-1 and top-10 hit rates, next to the plain distance's);
* **storage**: ``ranker.safetensors`` (weights and feature scale) + ``ranker.json`` (sizes, metrics,
  how it was trained), beside the template store or anywhere else; the labels are cached in the store
  folder (``ranker_labels.json``, plus any batches added with :func:`add_labels`, e.g. by
  ``composition-gen templates label``) so that retraining skips the matching and more labelled queries
  can be added later.

:func:`plain_distance_scores` is the untrained baseline the issue compares against: the L1 distance of
the aligned electronegativity / row / group / atomic-radius features, each scaled by its spread.
:func:`label_structure_types` clusters structures into types with the same matcher (a utility).
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

from evaluation.io import atomic_path, write_json
from structure.descriptors import DESCRIPTOR_SIZE, DESCRIPTOR_VERSION, MAX_ELEMENTS, N_PROPS, PROPERTIES

DEFAULT_RANKER = Path(__file__).parent / "pretrained" / "ranker"  # shipped, trained on MP structures
MATCHER_KW = {"ltol": 0.3, "stol": 0.5, "angle_tol": 10}  # the tolerances predictions are scored with


@dataclass
class RankerConfig:
    descriptor_size: int = DESCRIPTOR_SIZE
    descriptor_version: int = DESCRIPTOR_VERSION
    hidden: int = 128
    layers: int = 2
    trained: dict = field(default_factory=dict)  # how it was trained and its held-out metrics


class CompositionRanker(nn.Module):
    """Similarity of a (query, template) pair from ``|d_q - d_t|``: the plain distance, scaled, plus a
    learned MLP correction (see the module docstring)."""

    def __init__(self, config: RankerConfig):
        super().__init__()
        self.config = config
        dims = [config.descriptor_size] + [config.hidden] * config.layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.SiLU()]
        last = nn.Linear(dims[-1], 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*blocks, last)
        self.alpha = nn.Parameter(torch.ones(()))
        self.register_buffer("scale", torch.ones(config.descriptor_size))
        cols, weights = _plain_columns()
        plain = torch.zeros(config.descriptor_size)
        plain[torch.from_numpy(cols)] = torch.from_numpy(weights).float()
        self.register_buffer("plain_weight", plain)

    def forward(self, diff: torch.Tensor) -> torch.Tensor:
        """Scores (higher = more similar) of ``[..., D]`` absolute descriptor differences."""
        return -self.alpha * (diff @ self.plain_weight) + self.net(diff / self.scale).squeeze(-1)

    @torch.no_grad()
    def scores(self, query: np.ndarray, templates: np.ndarray) -> np.ndarray:
        """Scores of one query descriptor against ``[n, D]`` template descriptors."""
        self.eval()
        diff = torch.from_numpy(np.abs(templates - query[None]).astype(np.float32))
        return self(diff).numpy()

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
        config = RankerConfig(**json.loads((folder / "ranker.json").read_text()))
        if config.descriptor_version != DESCRIPTOR_VERSION:
            raise ValueError(f"{folder}: ranker uses descriptor version {config.descriptor_version}, this code "
                             f"{DESCRIPTOR_VERSION}: retrain it")
        model = cls(config)
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


def shortlist(store, query: int, size: int) -> np.ndarray:
    """The ``size`` templates of ``query``'s ratio group nearest to it by the plain distance (itself excluded)."""
    rows = store.rows_with_key(store.keys[query])
    rows = rows[rows != query]
    order = np.argsort(-plain_distance_scores(store.descriptors[query], store.descriptors[rows]), kind="stable")
    return rows[order[:size]]


def _label_one(store, query: int, size: int, matcher) -> dict:
    rows = shortlist(store, query, size)
    q = store.structure(query)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = [bool(matcher.fit_anonymous(store.structure(int(r)), q)) for r in rows]
    return {"query": int(query), "rows": rows, "labels": np.array(labels, dtype=bool)}


_WORKER_STORE = None


def _init_worker(path: str) -> None:
    global _WORKER_STORE
    from structure.templates import TemplateStore

    torch.set_num_threads(1)
    _WORKER_STORE = TemplateStore.load(path)


def _label_in_worker(args: tuple[int, int]) -> dict:
    return _label_one(_WORKER_STORE, args[0], args[1], _matcher())


def labelled_shortlists(store, n_queries: int = 1500, size: int = 50, seed: int = 0, workers: int = 1,
                        progress: bool = False) -> list[dict]:
    """Labelled shortlists of ``n_queries`` random store structures whose ratio group holds at least one
    other structure (see the module docstring). ``workers`` > 1 labels in processes (the store must have
    been saved)."""
    from tqdm.auto import tqdm

    sizes = store.ratio_keys()
    eligible = np.array([i for i, k in enumerate(store.keys) if sizes[k] >= 2], dtype=np.int64)
    queries = np.random.default_rng(seed).choice(eligible, size=min(n_queries, len(eligible)), replace=False)
    bar = dict(desc="labelling", unit="query", total=len(queries), disable=not progress)
    if workers > 1 and store.path is not None:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers, _init_worker, (str(store.path),)) as pool:
            return list(tqdm(pool.imap(_label_in_worker, [(int(q), size) for q in queries], chunksize=8), **bar))
    matcher = _matcher()
    return [_label_one(store, int(q), size, matcher) for q in tqdm(queries, **bar)]


# ------------------------------------------------------------------------------------------ training
def save_labels(lists: list[dict], path: str | Path, settings: dict) -> None:
    write_json(path, {"settings": settings, "matcher": MATCHER_KW,
                      "lists": [{"query": x["query"], "rows": x["rows"].tolist(), "labels": x["labels"].tolist()}
                                for x in lists]})


def _lists_from(data: dict) -> list[dict]:
    return [{"query": x["query"], "rows": np.array(x["rows"], dtype=np.int64), "labels": np.array(x["labels"], dtype=bool)}
            for x in data["lists"]]


def load_labels(path: str | Path | None, settings: dict | None = None) -> list[dict] | None:
    """Labels from ``path`` if it exists and was made with the current matcher (and, when given, the same
    ``settings``), else None."""
    if path is None or not Path(path).is_file():
        return None
    data = json.loads(Path(path).read_text())
    if (settings is not None and data.get("settings") != settings) or data.get("matcher") != MATCHER_KW:
        return None
    return _lists_from(data)


def label_files(folder: Path) -> list[Path]:
    """The store's label batches: ``ranker_labels.json`` (the first) and ``ranker_labels-seed*-n*.json``."""
    return sorted(Path(folder).glob("ranker_labels*.json"), key=lambda p: (p.name != "ranker_labels.json", p.name))


def cached_labels(store, size: int) -> list[dict]:
    """Every labelled shortlist cached in the store folder for shortlists of ``size`` (and the current
    matcher), each query once (the first batch that labelled it)."""
    if store.path is None:
        return []
    out, seen = [], set()
    for path in label_files(store.path):
        data = json.loads(path.read_text())
        if data.get("settings", {}).get("size") != size or data.get("matcher") != MATCHER_KW:
            continue
        for x in _lists_from(data):
            if x["query"] not in seen:
                seen.add(x["query"])
                out.append(x)
    return out


def add_labels(store, n_queries: int, size: int = 50, seed: int = 0, workers: int = 1,
               progress: bool = False) -> Path:
    """Label ``n_queries`` more store structures (drawn with ``seed``) and cache them in the store folder
    as ``ranker_labels-seed<seed>-n<n>.json``; :func:`train_ranker` uses every cached batch."""
    if store.path is None:
        raise ValueError("labels are cached beside a saved store: save the store first")
    lists = labelled_shortlists(store, n_queries, size, seed, workers, progress)
    path = store.path / f"ranker_labels-seed{seed}-n{n_queries}.json"
    save_labels(lists, path, {"n_queries": n_queries, "size": size, "seed": seed})
    return path


def _hit_rates(store, lists: list[dict], score_fn, ks=(1, 10)) -> dict[int, float]:
    """Share of ``lists`` whose best-scored ``k`` templates hold a positive."""
    hits = {k: 0 for k in ks}
    for x in lists:
        order = np.argsort(-score_fn(store.descriptors[x["query"]], store.descriptors[x["rows"]]), kind="stable")
        for k in ks:
            hits[k] += bool(x["labels"][order[:k]].any())
    return {k: v / max(len(lists), 1) for k, v in hits.items()}


def listwise_loss(model: CompositionRanker, diff: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """``-log`` of the softmax mass that a query's shortlist scores put on its positives."""
    scores = model(diff)
    return torch.logsumexp(scores, 0) - torch.logsumexp(scores.masked_fill(~positive, -torch.inf), 0)


def train_ranker(store, lists: list[dict] | None = None, config: RankerConfig | None = None, seed: int = 0,
                 epochs: int = 30, lr: float = 1e-3, lists_per_step: int = 32, heldout_fraction: float = 0.2,
                 n_queries: int = 1500, size: int = 50, workers: int = 1, progress: bool = False) -> CompositionRanker:
    """Train a :class:`CompositionRanker` on labelled shortlists of ``store``: ``lists`` if given, else
    every batch cached in the store folder (:func:`cached_labels`), else ``n_queries`` newly labelled
    ones (drawn with ``seed``, then cached as ``ranker_labels.json``). Held-out queries' top-1 and
    top-10 hit rates, next to the plain distance's and the shortlist's ceiling, go into
    ``ranker.config.trained``."""
    t0 = time.time()
    if lists is None:
        lists = cached_labels(store, size)
        if not lists:
            lists = labelled_shortlists(store, n_queries, size, seed, workers, progress)
            if store.path is not None:
                save_labels(lists, store.path / "ranker_labels.json", {"n_queries": n_queries, "size": size, "seed": seed})
    order = np.random.default_rng(seed).permutation(len(lists))
    n_held = int(round(heldout_fraction * len(lists))) if len(lists) > 1 else 0
    held = [lists[i] for i in order[:n_held]]
    train = [lists[i] for i in order[n_held:]]
    usable = [x for x in train if 0 < x["labels"].sum() < len(x["labels"])]
    if not usable:
        raise ValueError("no training query has both a matching and a non-matching template in its shortlist; "
                         "use more queries or a larger store")
    tensors = [(torch.from_numpy(np.abs(store.descriptors[x["rows"]] - store.descriptors[x["query"]][None])),
                torch.from_numpy(x["labels"])) for x in usable]
    torch.manual_seed(seed)
    model = CompositionRanker(config or RankerConfig())
    model.scale.copy_(torch.from_numpy(np.maximum(store.descriptors.std(0), 1e-6).astype(np.float32)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(tensors), generator=g).split(lists_per_step):
            loss = torch.stack([listwise_loss(model, *tensors[int(k)]) for k in batch]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    trained = {"seed": seed, "epochs": epochs, "lr": lr, "loss": "listwise", "n_queries_train": len(train),
               "n_queries_used": len(usable), "n_queries_heldout": len(held), "shortlist": size,
               "store": str(store.path) if store.path else store.meta.get("source", ""),
               "matcher": MATCHER_KW, "alpha": float(model.alpha.detach())}
    if held:
        learned, plain = _hit_rates(store, held, model.scores), _hit_rates(store, held, plain_distance_scores)
        trained.update({"heldout_top1": learned[1], "heldout_top10": learned[10],
                        "heldout_top1_plain_distance": plain[1], "heldout_top10_plain_distance": plain[10],
                        "heldout_ceiling": float(np.mean([x["labels"].any() for x in held]))})
    trained["seconds"] = time.time() - t0
    model.config.trained = trained
    return model


@functools.cache
def _plain_columns() -> tuple[np.ndarray, np.ndarray]:
    """Columns of the aligned electronegativity, row, group and atomic radius in the descriptor, and the
    weight of each (1 / the property's spread over the table): the plain distance."""
    from structure.descriptors import property_scale

    pick = [PROPERTIES.index(p) for p in ("electronegativity", "row", "group", "atomic_radius")]
    cols = np.array([slot * N_PROPS + p for slot in range(MAX_ELEMENTS) for p in pick])
    return cols, np.tile(1 / property_scale()[pick], MAX_ELEMENTS)
