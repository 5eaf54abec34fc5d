"""Online features: per-key windows in event time, durable state, enrichment, backfill.

- :mod:`.definition`: the features, declared once (Python or YAML);
- :mod:`.windows`, :mod:`.aggregates`, :mod:`.engine`: the one code path computing them;
- :mod:`.rows`: decoded events to the engine's rows;
- :mod:`.state`: frames of state, committed with their offsets (file, Redis);
- :mod:`.stage`: :class:`FeatureStage`, the pipeline stage;
- :mod:`.enrich`: :class:`Enrich`, look-ups once per batch with a TTL cache;
- :mod:`.backfill`: the same features over historical events, for training.
"""

from __future__ import annotations

from .backfill import backfill, backfill_rows
from .definition import Feature, FeatureSet, Window, load_definition
from .engine import Engine, Partition
from .enrich import Enrich, PostgresLookup, RedisLookup
from .stage import FeatureStage
from .state import FileStore, RedisStore, open_store

__all__ = [
    "Engine",
    "Enrich",
    "Feature",
    "FeatureSet",
    "FeatureStage",
    "FileStore",
    "Partition",
    "PostgresLookup",
    "RedisLookup",
    "RedisStore",
    "Window",
    "backfill",
    "backfill_rows",
    "load_definition",
    "open_store",
]
