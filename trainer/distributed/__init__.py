"""Launch environment, process groups, and CPU compatibility patches."""
from trainer.distributed.launch import LaunchEnv, LaunchError, init_distributed, read_launch_env
from trainer.distributed.layout import LayoutError, ParallelLayout

__all__ = ["LaunchEnv", "LaunchError", "LayoutError", "ParallelLayout", "init_distributed",
           "read_launch_env"]
