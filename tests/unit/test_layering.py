"""The import layering of the package (DESIGN.md "Layering"), checked on the source with ``ast``.

    kernels < config < distributed < losses, data < moe < models < optim, step, checkpoint
            < eval, export < trainer loop, dmu < tools (and the CLI, trainer/train.py)

A module imports only modules of its own layer or below (function-local imports count too),
never a ``_private`` name of another module, and nothing imports the CLI ``trainer.train``.
``bench/`` and ``tools/`` are the top layer; tests are not checked.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("kernels", "trainer", "tools", "bench")

# (layer, name, module prefixes): the longest matching prefix decides a module's layer
LAYERS = [
    (0, "kernels", ("kernels",)),
    (1, "config", ("trainer.__init__", "trainer.config", "trainer.config_base",
                   "trainer.eval.config", "trainer.config_docs",
                   "trainer.config_cli", "trainer.io", "trainer.data.config",
                   "trainer.moe.config", "trainer.dmu.config", "trainer.models.presets")),
    (2, "distributed", ("trainer.distributed", "trainer.signals")),
    (3, "losses, data", ("trainer.losses", "trainer.data")),
    (4, "moe", ("trainer.moe",)),
    (5, "models", ("trainer.models", "trainer.hub")),
    (6, "optim, step, checkpoint", ("trainer.optim", "trainer.step", "trainer.step_cache",
                                    "trainer.checkpoint", "trainer.reshard", "trainer.metrics",
                                    "trainer.resume",
                                    "trainer.wandb_logger")),
    (7, "eval, export", ("trainer.eval", "trainer.export", "trainer.upcycle",
                         "trainer.remote_code", "trainer.model_card")),
    (8, "trainer loop, dmu", ("trainer.trainer", "trainer.dmu")),
    (9, "tools", ("tools", "bench", "trainer.train", "trainer.dmu.__main__")),
]
CLI = "trainer.train"


def layer_of(module: str) -> tuple[int, str]:
    if module == "trainer":  # the package itself (its __init__ imports nothing)
        module = "trainer.__init__"
    best = (-1, None, "")
    for layer, name, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best[2]):
                best = (layer, name, p)
    if best[1] is None:
        raise AssertionError(f"{module}: no layer in tests/unit/test_layering.py LAYERS")
    return best[0], best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def ours(name: str) -> bool:
    return name.split(".")[0] in SOURCES


def imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every import of our own code, and
    (line, module, attribute) for every ``alias._private`` use of a module imported as ``alias``."""
    module = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    out, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if ours(a.name):
                    out.append((node.lineno, a.name, None))
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, path.name == "__init__.py", node)
            if ours(target):
                for a in node.names:
                    out.append((node.lineno, target, a.name))
                    if is_submodule(target, a.name):
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            out.append((node.lineno, aliases[node.value.id], node.attr))
    return out


def is_submodule(target: str, name: str) -> bool:
    parts = target.split(".") + [name]
    p = ROOT.joinpath(*parts)
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def violations(path: Path) -> list[str]:
    module = module_name(path)
    mine, mine_name = layer_of(module)
    rel = path.relative_to(ROOT)
    found = []
    for line, target, name in sorted(set(imports(path)), key=str):
        full = target
        if name is not None and is_submodule(target, name):
            full = f"{target}.{name}"  # `from trainer import checkpoint` imports a module
        if full == CLI or full.startswith(CLI + "."):
            found.append(f"{rel}:{line}: imports the CLI {CLI}")
            continue
        theirs, their_name = layer_of(full)
        if theirs > mine:
            found.append(f"{rel}:{line}: {module} (layer '{mine_name}') imports {full} "
                         f"(layer '{their_name}', above it)")
        if name and name.startswith("_") and not name.startswith("__"):
            # a private submodule of the importer's own package (kernels._ext) is its own business
            own = full != target and (module == target or module.startswith(target + "."))
            if not own:
                found.append(f"{rel}:{line}: {module} imports the private name {name} of {target}")
    return list(dict.fromkeys(found))


def source_files() -> list[Path]:
    files = []
    for top in SOURCES:
        files += [p for p in sorted((ROOT / top).rglob("*.py")) if "_build" not in p.parts]
    return files


def test_every_module_has_a_layer():
    for path in source_files():
        layer_of(module_name(path))


def test_lower_layers_never_import_higher_ones():
    found = [v for path in source_files() for v in violations(path)]
    assert not found, "layering violations:\n" + "\n".join(found)


def test_the_checker_catches_an_inverted_import(tmp_path, monkeypatch):
    """A planted upward import (moe importing the checkpoint code), a private name and an import
    of the CLI are each reported."""
    bad = ROOT / "trainer" / "moe" / "_layering_probe.py"
    bad.write_text("from trainer import checkpoint\nfrom trainer.data.stream import _x\n"
                   "def f():\n    import trainer.train\n")
    try:
        found = violations(bad)
    finally:
        bad.unlink()
    assert any("imports trainer.checkpoint (layer 'optim, step, checkpoint'" in v for v in found)
    assert any("private name _x of trainer.data.stream" in v for v in found)
    assert any("imports the CLI trainer.train" in v for v in found)


@pytest.mark.parametrize("module,layer", [("trainer.moe.config", 1), ("trainer.moe.layer", 4),
                                          ("trainer.models.presets", 1), ("tools.evaluate", 9)])
def test_layer_of(module, layer):
    assert layer_of(module)[0] == layer
