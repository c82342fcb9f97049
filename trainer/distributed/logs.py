"""Logs a person can read: INFO from rank 0, warnings and errors from every rank (tagged with
the rank), and the few dependency messages known to be harmless filtered one by one, each
with its reason. Nothing is silenced wholesale: an unknown warning still prints.

    setup_logging(rank)            # trainer/train.py, once the launch environment is known
    optional_dependencies()        # one line for the optional Apex / Transformer Engine

What we can prevent at the source is prevented there, not filtered: DeepSpeed's "Setting
accelerator to CPU" (DS_ACCELERATOR=cpu, trainer/distributed/cpu_compat.py) and megatron's
deprecated ``cuda_graph_scope="full"`` default (trainer/models/clip.py passes the current
``[]``). tests/distributed/test_train_run.py fails on any warning line of a 2-rank training
run that this module does not account for.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings

FORMAT, DATEFMT = "[%(asctime)s] %(message)s", "%H:%M:%S"
OPTIONAL = ("apex", "transformer_engine")

# Python warnings: (category, message regex, warning module regex, why it is harmless)
BENIGN_WARNINGS = (
    (UserWarning, r"(Transformer Engine and )?Apex (is|are) not installed", r"megatron\.core\.",
     # both optional (DESIGN.md): megatron-core falls back to torch in 6 modules, warning
     # once per module per rank; optional_dependencies() says it once
     "optional Apex / Transformer Engine"),
    (FutureWarning, r"`load_state_dict` is deprecated", r"megatron\.core\.dist_checkpointing\.",
     # megatron-core 0.16.1's torch_dist loader calls torch.distributed.checkpoint's old
     # entry point; the result is the same and the fix is megatron's
     "megatron-core calls a deprecated torch.distributed.checkpoint function"),
)


class KnownMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str, why: str):
        super().__init__()
        self.prefix, self.why = prefix, why

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# Log records: logger name -> (message prefix, why it is harmless)
BENIGN_LOGS = {
    # Our MoE module is the layer spec's ``mlp`` (DESIGN.md "DeepSpeed MoE inside
    # megatron-core layers"); megatron builds it with the default kwargs, which it takes.
    "megatron.core.transformer.transformer_layer": (
        "Unknown MLP type:", "our MoE MLP in megatron's layer spec"),
    # A CUDA toolkit on a machine without a GPU: DeepSpeed's op builder imports
    # torch.utils.cpp_extension, which notes it; nothing is compiled at run time
    # (DS_BUILD_OPS=0; kernels/ loads its extension on CUDA only).
    "torch.utils.cpp_extension": (
        "No CUDA runtime is found", "CUDA toolkit without a GPU"),
}


class RankZeroInfo(logging.Filter):
    """INFO and below only on rank 0; WARNING and above from every rank."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def install_filters() -> None:
    """The benign-message filters (idempotent). Before megatron / DeepSpeed are imported:
    several of these are emitted at import time."""
    for category, message, module, _ in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, (prefix, why) in BENIGN_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, KnownMessage) for f in logger.filters):
            logger.addFilter(KnownMessage(prefix, why))


class LevelFormatter(logging.Formatter):
    """``[12:00:00] message``; warnings and errors say so: ``[12:00:00] WARNING: message``
    (``[12:00:00 rank 3] ERROR: ...`` on rank 3)."""

    def __init__(self, rank: int):
        super().__init__(FORMAT if rank == 0 else f"[%(asctime)s rank {rank}] %(message)s",
                         DATEFMT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            record = logging.makeLogRecord(
                {**record.__dict__, "message": f"{record.levelname}: {record.message}"})
        return super().formatMessage(record)


def setup_logging(rank: int) -> None:
    """Our "upclip" logger and the root handler: rank 0 prints INFO, the other ranks their
    warnings and errors, tagged ``rank N``; megatron's INFO (every parameter) is off."""
    logging.basicConfig(level=logging.INFO, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(LevelFormatter(rank))
        handler.addFilter(RankZeroInfo(rank))
    logging.getLogger("megatron").setLevel(logging.WARNING)  # it lists every param at INFO
    install_filters()


def optional_dependencies() -> str:
    """One line on the optional accelerators of megatron-core, e.g. "apex: not installed,
    transformer_engine: not installed (optional: megatron-core uses torch fallbacks)"."""
    state = [f"{name}: {'installed' if importlib.util.find_spec(name) else 'not installed'}"
             for name in OPTIONAL]
    return ", ".join(state) + " (optional: megatron-core uses torch fallbacks)"
