"""Scale-out of the relaxation / stability stage on Dask (``dask.distributed``).

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

__all__ = ["score_chunks_on_dask"]


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


def score_chunks_on_dask(scorer, chunks: Sequence[Sequence], scheduler) -> Iterator[tuple[int, list]]:
    """``(chunk number, records)`` for every chunk of structures, in the order they finish."""
    from distributed import as_completed

    from structure.stability import StabilityRecord

    elements = sorted({el.symbol for chunk in chunks for s in chunk if s is not None for el in s.composition.elements})
    for el in elements:  # relax the references here, once; the workers read them from the cache
        try:
            scorer.relaxer.references.energy_per_atom(el)
        except ValueError:
            pass  # the records say "no formation energy" for that element, as locally
    if scorer.potential.spec is None:
        raise ValueError("a potential wrapped from an ASE calculator cannot be sent to Dask workers: pass its name "
                         "or folder")
    settings = tuple(sorted(scorer.settings().items()))
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
