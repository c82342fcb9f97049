"""Command-line forms of config overrides and named configs (no torch import).

Overrides may be written ``key.sub=value`` (ours, lingua's), ``--key.sub=value`` or
``--key.sub value`` (torchtitan's); a bool key alone (``--train.tensorboard``) means true.
``--config NAME`` finds ``NAME`` as a path, else ``configs/NAME[.yaml]`` of the checkout or the
copy the installed package carries (``pip install``: ``trainer/configs/``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from trainer.config_docs import key_table

CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"   # the source tree
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"       # a wheel (pyproject.toml)


BOOL_WORDS = ("true", "false", "yes", "no", "on", "off")  # what YAML reads as a bool


class CliError(ValueError):
    """A malformed override flag; the message names it."""


def _is_key_flag(token: str, keys: dict) -> bool:
    if not token.startswith("--") or len(token) < 3:
        return False
    name = token[2:].split("=", 1)[0]
    return "." in name or name in keys


def overrides_from_argv(argv: list[str], root: type) -> list[str]:
    """``argv`` with every ``--key.sub=value`` / ``--key.sub value`` / ``--flag`` (bool) turned
    into ``key.sub=value``; other tokens (``--config X``, ``a.b=1``) are left as they are.
    A ``--name`` counts as a key when it has a dot or is a top-level key of ``root``."""
    keys = key_table(root)
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not _is_key_flag(token, keys):
            out.append(token)
            continue
        name = token[2:]
        if "=" in name:
            out.append(name)
            continue
        info = keys.get(name)
        if info is not None and info.type == "bool":
            nxt = argv[i] if i < len(argv) else None
            if nxt is not None and nxt.lower() in BOOL_WORDS:
                out.append(f"{name}={nxt}")
                i += 1
            else:
                out.append(f"{name}=true")
            continue
        if i >= len(argv):
            raise CliError(f"{token} needs a value ({token} VALUE or {token}=VALUE)")
        out.append(f"{name}={argv[i]}")
        i += 1
    return out


def config_dirs() -> list[Path]:
    return [d for d in (CHECKOUT_CONFIGS, PACKAGED_CONFIGS) if d.is_dir()]


def named_configs() -> list[str]:
    """The shipped configs' names (``smoke``, ``b16_upcycle``, ...)."""
    return sorted({p.stem for d in config_dirs() for p in d.glob("*.yaml")})


def resolve_config_path(value: str | Path) -> Path | None:
    """``value`` if it is a file; else, for ``NAME``, ``NAME.yaml`` or ``configs/NAME.yaml``,
    the shipped config of that name; else None."""
    path = Path(value)
    if path.is_file():
        return path
    if path.is_absolute() or path.parent not in (Path("."), Path("configs")):
        return None
    name = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    for folder in config_dirs():
        if (folder / name).is_file():
            return folder / name
    return None


def parse_config_args(parser: argparse.ArgumentParser, argv: list[str], root: type):
    """``parser.parse_intermixed_args`` after the ``--key.sub`` forms became ``key.sub=value``
    (options and overrides may then come in any order); a malformed flag exits 2 with usage."""
    try:
        argv = overrides_from_argv(argv, root)
    except CliError as e:
        parser.error(str(e))
    return parser.parse_intermixed_args(argv)
