"""Guarded access to the compiled extension: loaded on first use, never at `import kernels`.

A missing or broken build is remembered as a reason string; `backend="auto"` then falls back to
the reference and `backend="cuda"` raises ExtensionNotBuiltError with that reason and the build
command.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from types import ModuleType

MODULE_NAME = "upclip_kernels_C"
BUILD_COMMAND = "CUDA_HOME=/usr/local/cuda MAX_JOBS=2 python -m kernels.build"
DISABLE_ENV = "UPCLIP_KERNELS_DISABLE"  # =1: behave as if the extension were not built
BUILD_DIR_ENV = "UPCLIP_KERNELS_BUILD_DIR"


class ExtensionNotBuiltError(RuntimeError):
    """backend="cuda" was requested but the CUDA extension cannot be used."""


def build_dir() -> Path:
    return Path(os.environ.get(BUILD_DIR_ENV) or Path(__file__).resolve().parent / "_build")


def library_path() -> Path:
    return build_dir() / f"{MODULE_NAME}.so"


@functools.lru_cache(maxsize=None)
def load() -> tuple[ModuleType | None, str | None]:
    """(module, None) when the extension imports, else (None, why not)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None, f"disabled by {DISABLE_ENV}=1"
    path = library_path()
    if not path.exists():
        return None, f"{path} does not exist"
    try:
        import torch  # noqa: F401  (the library links against libtorch)

        spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as error:  # ImportError, undefined symbols after a torch upgrade, ...
        return None, f"importing {path} failed: {error}"
    return module, None


def extension_available() -> bool:
    return load()[0] is not None


def extension_status() -> str:
    """One line for logs: what was built, or why there is no extension."""
    module, reason = load()
    if module is None:
        return f"kernels CUDA extension: not available ({reason})"
    info = module.build_info()
    return (f"kernels CUDA extension: {library_path()} "
            f"(archs {', '.join(info['archs'])}; dtypes {', '.join(info['dtypes'])})")


def missing_message(reason: str) -> str:
    return (f"kernels: backend='cuda' needs the CUDA extension, which is not available ({reason}). "
            f"Build it with `{BUILD_COMMAND}` (needs nvcc and `pip install nvidia-cutlass`; "
            f"add --reduced for a bf16-only build), or pass backend='auto' to fall back to the "
            f"PyTorch reference.")


def extension() -> ModuleType:
    module, reason = load()
    if module is None:
        raise ExtensionNotBuiltError(missing_message(reason))
    return module
