import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def dist1():
    """A one-process gloo world with megatron-core's groups at tp=pp=1 (CPU)."""
    from trainer.distributed import ParallelLayout, init_distributed, read_launch_env

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    init_distributed(read_launch_env(env))
    return ParallelLayout(1).initialize()
