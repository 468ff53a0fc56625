"""Scale-out of the relaxation / stability stage: local worker processes, or Dask (``dask.distributed``).

:func:`score_chunks_locally` keeps a pool of local processes, each holding one
:class:`~structure.stability.StabilityScorer` (its potentials loaded once) for every chunk it is handed, and yields
each chunk's records as it finishes: the discovery funnel journals every structure as soon as it is scored, no worker
waits for a slow neighbour's chunk, and nothing is loaded twice.

:func:`score_chunks_on_dask` sends chunks of structures to a Dask scheduler (``tcp://host:8786``, a
``LocalCluster``, or a cluster that ``dask-jobqueue`` started on SLURM/PBS: all are a ``Client`` away) and
yields each chunk's :class:`~structure.stability.StabilityRecord` s as soon as it comes back, so the discovery
funnel appends them to the same journal as local workers do. Each Dask worker process builds one
:class:`~structure.stability.StabilityScorer` from the scorer's :meth:`~StabilityScorer.settings` (potential,
reference table, elemental-reference store: paths the workers can read, e.g. on a shared file system) and
keeps it for every chunk it gets. The elemental references are relaxed once, by the caller, before any chunk
is sent; workers read them from the cache file.

Needs ``pip install "dask[distributed]"``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

__all__ = ["score_chunks_locally", "score_chunks_on_dask"]


def _client(scheduler):
    try:
        from distributed import Client
    except ImportError as err:  # an optional dependency
        raise ValueError("--scheduler needs Dask: pip install 'dask[distributed]'") from err
    if isinstance(scheduler, Client):
        return scheduler, False
    if hasattr(scheduler, "scheduler_address"):  # a LocalCluster or a dask-jobqueue cluster
        return Client(scheduler), True
    return Client(str(scheduler), timeout="30s"), True


@functools.cache
def _worker_scorer(settings: tuple):
    from structure.stability import StabilityScorer

    return StabilityScorer(**dict(settings))


def _score_chunk(settings: tuple, payloads: list[dict | None]) -> list[dict]:
    """Runs on a Dask worker: score structures given as ``Structure.as_dict()``; records as plain dicts."""
    import torch
    from pymatgen.core import Structure

    torch.set_num_threads(1)
    scorer = _worker_scorer(settings)
    records = scorer.score([Structure.from_dict(p) if p is not None else None for p in payloads])
    return [r.as_dict() for r in records]


def _numbered_chunk(item: tuple[int, list[dict | None]], settings: tuple) -> tuple[int, list[dict]]:
    """Runs in a local worker: :func:`_score_chunk` with the chunk's number."""
    k, payloads = item
    return k, _score_chunk(settings, payloads)


def _worker_settings(scorer, chunks: Sequence[Sequence]) -> tuple:
    """Relax the elemental references of every element in ``chunks`` here, once (the workers read them from the
    cache), and return the settings that rebuild ``scorer`` in a worker."""
    elements = sorted({el.symbol for chunk in chunks for s in chunk if s is not None for el in s.composition.elements})
    for el in elements:  # relax the references here, once; the workers read them from the cache
        try:
            scorer.relaxer.references.energy_per_atom(el)
        except ValueError:
            pass  # the records say "no formation energy" for that element, as locally
    if scorer.potential.spec is None:
        raise ValueError("a potential wrapped from an ASE calculator cannot be sent to worker processes: pass its "
                         "name or folder")
    return tuple(sorted(scorer.settings().items()))


def score_chunks_locally(scorer, chunks: Sequence[Sequence], workers: int) -> Iterator[tuple[int, list]]:
    """``(chunk number, records)`` for every chunk of structures, in the order they finish, scored by a pool of
    ``workers`` local processes that each build ``scorer`` once (one torch thread each)."""
    import multiprocessing

    from structure.relax import _single_threaded_children
    from structure.stability import StabilityRecord

    settings = _worker_settings(scorer, chunks)
    payloads = [(k, [s.as_dict() if s is not None else None for s in chunk]) for k, chunk in enumerate(chunks)]
    with _single_threaded_children():
        pool = multiprocessing.get_context("spawn").Pool(max(1, min(workers, len(chunks))))
    with pool:
        for k, dicts in pool.imap_unordered(functools.partial(_numbered_chunk, settings=settings), payloads):
            yield k, [StabilityRecord.from_dict(d) for d in dicts]


def score_chunks_on_dask(scorer, chunks: Sequence[Sequence], scheduler) -> Iterator[tuple[int, list]]:
    """``(chunk number, records)`` for every chunk of structures, in the order they finish."""
    from distributed import as_completed

    from structure.stability import StabilityRecord

    settings = _worker_settings(scorer, chunks)
    client, own = _client(scheduler)
    try:
        futures = {client.submit(_score_chunk, settings, [s.as_dict() if s is not None else None for s in chunk],
                                 pure=False): k for k, chunk in enumerate(chunks)}
        for future in as_completed(futures):
            k = futures[future]
            yield k, [StabilityRecord.from_dict(d) for d in future.result()]
    finally:
        if own:
            client.close()
