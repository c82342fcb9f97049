"""Data: shard schema, webdataset pipeline, box-aware transforms, tokenizers (see README.md).

Importing `trainer.data.config` stays torch-free; the names below load their modules lazily.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AugmentConfig": "trainer.data.config",
    "DataConfig": "trainer.data.config",
    "DataConfigError": "trainer.data.config",
    "TokenizerConfig": "trainer.data.config",
    "build_tokenizer": "trainer.data.tokenizer",
    "DataCounters": "trainer.data.counters",
    "ShardLoader": "trainer.data.pipeline",
    "build_train_loader": "trainer.data.pipeline",
    "build_eval_loader": "trainer.data.pipeline",
    "data_parallel_rank_world": "trainer.data.pipeline",
    "expand_urls": "trainer.data.urls",
    "normalize_on_device": "trainer.data.normalize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
