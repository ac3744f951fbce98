"""A crash-safe, sharded output store for dataset-wide explanation jobs (numpy and the standard library).

Built for jobs like "explain ImageNet-val (50,000 images) with DDP over many ranks, on a cluster
that may preempt or kill the job at any instant": every rank appends its masks and manifest rows
to its own shard files, nothing is ever rewritten in place, a rerun of the same command resumes,
and results are read back lazily with a small, stated memory footprint. No torch and no Lightning
in here: :class:`~neuromask_pl.callbacks.MaskWriter` drives it.

Modules, in the order a job uses them:

- :mod:`~neuromask_pl.store.layout`: the files of a store and their format; :func:`open_store`
  creates, checks, resumes or overwrites ``store.json``; :func:`config_hash`.
- :mod:`~neuromask_pl.store.lock`: :class:`StoreLock`, one writing job per directory.
- :mod:`~neuromask_pl.store.writer`: :class:`ShardWriter`, one rank's crash-safe shards;
  :func:`source_fingerprint` of a sample's file.
- :mod:`~neuromask_pl.store.scan`: :func:`scan_shards` sorts shards into good and bad.
- :mod:`~neuromask_pl.store.index`: :func:`merge_index` writes ``manifest.csv`` and ``index.npz``.
- :mod:`~neuromask_pl.store.reader`: :func:`load_results`, :class:`StoredResults`, :func:`read_manifest`,
  :func:`resume_state` (what a rerun skips, which sources changed).
- :mod:`~neuromask_pl.store.io`: atomic writes, fsync, file hashes, the time, package versions;
  :class:`StoreWriteError`, the one-line error of a write that failed (disk full, read-only folder).
"""

from neuromask_pl.store.index import INDEX_BYTES_PER_SAMPLE, MergeReport, merge_index
from neuromask_pl.store.io import StoreWriteError, atomic_write
from neuromask_pl.store.layout import FORMAT_VERSION, StoreInfo, config_hash, open_store, read_store_info
from neuromask_pl.store.lock import StoreLock
from neuromask_pl.store.reader import ResumeState, StoredResults, load_results, read_manifest, resume_state
from neuromask_pl.store.scan import BadShard, ShardInfo, ShardScan, scan_shards
from neuromask_pl.store.writer import ShardWriter, source_fingerprint

__all__ = [
    "FORMAT_VERSION",
    "INDEX_BYTES_PER_SAMPLE",
    "BadShard",
    "MergeReport",
    "ResumeState",
    "ShardInfo",
    "ShardScan",
    "ShardWriter",
    "StoreInfo",
    "StoreLock",
    "StoreWriteError",
    "StoredResults",
    "atomic_write",
    "config_hash",
    "load_results",
    "merge_index",
    "open_store",
    "read_manifest",
    "read_store_info",
    "resume_state",
    "scan_shards",
    "source_fingerprint",
]
