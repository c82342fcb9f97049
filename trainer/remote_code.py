"""The modeling file of an export (``modeling_upclip.py``), generated from this repository's
source, so that transformers loads the export without UpCLIP installed:

    model = transformers.AutoModel.from_pretrained("exports/b16-moe", trust_remote_code=True)
    model.clip                                  # trainer/hub.py's UpCLIPModel, plain torch
    model.get_image_features(pixel_values=images), model.get_text_features(input_ids=tokens)

Nothing in the file is maintained by hand twice. ``modeling_source()`` copies from the source
files below the top-level definitions the plain model needs (found by following the names
used by ``UpCLIPModel``, ``ModelConfig`` and ``from_dict`` through each file's own
definitions and its imports from this repository), in file order, with the imports of outside
packages they use. Config checks (``validate``) are left out: an export's config was checked
when it was written. Two names are glue written here: ``expert_mlp`` (``kernels.expert_mlp``
served by the PyTorch reference: the CUDA extension and torch's grouped mm are not shipped)
and the transformers classes ``UpCLIPConfig`` / ``UpCLIPHFModel`` (``model_type`` "upclip";
the weights keep the plain model's names, ``base_model_prefix = "clip"`` maps them).

The generator refuses (``RemoteCodeError``) a definition that needs a name it cannot find, a
function-local import of this repository, and one name defined by two files.
"""
from __future__ import annotations

import ast
import builtins
import symtable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILE_NAME = "modeling_upclip.py"
MODEL_TYPE = "upclip"
CONFIG_CLASS, MODEL_CLASS = "UpCLIPConfig", "UpCLIPHFModel"
AUTO_MAP = {"AutoConfig": f"modeling_upclip.{CONFIG_CLASS}",
            "AutoModel": f"modeling_upclip.{MODEL_CLASS}"}
OURS = ("trainer", "kernels")  # top-level packages of this repository

# Dependency order: a file's definitions may use those of the files above it.
SOURCES = ("kernels/activations.py", "kernels/layout.py", "kernels/reference.py",
           "trainer/moe/routing.py", "trainer/moe/config.py", "trainer/config_base.py",
           "trainer/config.py",
           "trainer/models/prompter.py", "trainer/hub.py")
ROOTS = (("trainer/hub.py", "UpCLIPModel"), ("trainer/config.py", "ModelConfig"),
         ("trainer/config.py", "from_dict"))
LEFT_OUT_METHODS = {"validate", "superclasses"}  # config checks and file reading

# (module, name) imported by a source file from a module that is not shipped -> glue
# (source, the (file, name) definitions it uses)
GLUE = {("kernels", "expert_mlp"): ('''
def expert_mlp(x, w1, b1, w2, b2, counts, *, activation="gelu"):
    """kernels.expert_mlp served by the PyTorch reference (kernels/reference.py)."""
    bounds = host_bounds(counts, x.shape[0], None)
    return expert_mlp_reference(x, w1, b1, w2, b2, bounds, activation)
''', (("kernels/layout.py", "host_bounds"), ("kernels/reference.py", "expert_mlp_reference")))}

TRANSFORMERS_GLUE = f'''

# -------------------- transformers (trainer/remote_code.py TRANSFORMERS_GLUE)

class {CONFIG_CLASS}(PretrainedConfig):
    """config.json of an UpCLIP export: ``model`` is trainer.config.ModelConfig as a dict;
    ``tokenizer``, ``preprocess`` and ``source`` describe the data and the checkpoint."""
    model_type = "{MODEL_TYPE}"

    def __init__(self, model: dict | None = None, **kwargs):
        self.model = model or {{}}
        super().__init__(**kwargs)


class {MODEL_CLASS}(PreTrainedModel):
    """The plain CLIP (``self.clip``: UpCLIPModel) under transformers' loading; the weights
    file holds the plain model's names (``base_model_prefix`` maps them onto ``clip``)."""
    config_class = {CONFIG_CLASS}
    base_model_prefix = "clip"
    main_input_name = "pixel_values"

    def __init__(self, config: {CONFIG_CLASS}):
        super().__init__(config)
        self.clip = UpCLIPModel(from_dict(ModelConfig, config.model, "model"))
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from model.safetensors

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[b, 3, H, W]`` -> ``[b, e]``, not normalised (UpCLIPModel.encode_image)."""
        return self.clip.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, L]`` token ids (one end-of-text token per row) -> ``[b, e]``."""
        return self.clip.encode_text(input_ids)

    def forward(self, pixel_values: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None) -> dict:
        """Normalised features and logit_scale (and logit_bias), as UpCLIPModel.forward."""
        return self.clip(pixel_values, input_ids)
'''
TRANSFORMERS_IMPORT = "from transformers import PreTrainedModel, PretrainedConfig"


class RemoteCodeError(RuntimeError):
    """The model code cannot be shipped as one file; the message says which name and why."""


class _File:
    """One source file: its top-level definitions, imports from this repository and from
    outside, by the name they bind."""

    def __init__(self, rel: str):
        self.rel = rel
        self.text = (ROOT / rel).read_text()
        self.lines = self.text.splitlines()
        self.defs: dict[str, ast.stmt] = {}
        self.ours: dict[str, tuple[str, str]] = {}      # name -> (module, name there)
        self.outside: dict[str, str] = {}               # name -> import statement
        for node in ast.parse(self.text).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                self.defs[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            self.defs[n.id] = node
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                mine = (node.module or "").split(".")[0] in OURS or node.level
                for a in node.names:
                    bound = a.asname or a.name
                    if mine:
                        self.ours[bound] = (node.module, a.name)
                    else:
                        alias = f" as {a.asname}" if a.asname else ""
                        self.outside[bound] = f"from {node.module} import {a.name}{alias}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in OURS:
                        self.ours[a.asname or a.name.split(".")[0]] = (a.name, "")
                    elif a.asname:
                        self.outside[a.asname] = f"import {a.name} as {a.asname}"
                    else:
                        self.outside[a.name.split(".")[0]] = f"import {a.name}"

    def kept(self, node: ast.stmt) -> tuple[str, ast.stmt]:
        """The definition's source text and AST without the left-out methods."""
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        while start > 1 and self.lines[start - 2].startswith("#"):  # its comment
            start -= 1
        lines = self.lines[start - 1:node.end_lineno]
        if not isinstance(node, ast.ClassDef):
            return "\n".join(lines), node
        drop = [m for m in node.body if isinstance(m, ast.FunctionDef)
                and m.name in LEFT_OUT_METHODS]
        for m in sorted(drop, key=lambda m: -m.lineno):
            first = min([m.lineno] + [d.lineno for d in m.decorator_list])
            del lines[first - start:m.end_lineno - start + 1]
        while lines and not lines[-1].strip():
            lines.pop()
        pruned = ast.ClassDef(**{**node.__dict__, "body": [m for m in node.body
                                                          if m not in drop]})
        return "\n".join(lines), pruned


def _names(node: ast.AST) -> set[str]:
    """Every name a definition reads (annotations included: dataclass fields are resolved
    by ``typing.get_type_hints``); local names are harmless extras."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _module_file(module: str) -> str:
    for rel in (module.replace(".", "/") + ".py", module.replace(".", "/") + "/__init__.py"):
        if rel in SOURCES:
            return rel
    return ""


def modeling_source() -> str:
    """The text of ``modeling_upclip.py`` (see the module docstring)."""
    files = {rel: _File(rel) for rel in SOURCES}
    chosen: set[tuple[str, str]] = set()
    glue: dict[str, str] = {}
    imports: set[str] = set()
    todo = list(ROOTS)
    while todo:
        rel, name = todo.pop()
        if (rel, name) in chosen:
            continue
        f = files[rel]
        if name not in f.defs:
            raise RemoteCodeError(f"{rel}: no top-level definition of {name!r}")
        chosen.add((rel, name))
        _, node = f.kept(f.defs[name])
        local = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))
                 and ((getattr(n, "module", None) or n.names[0].name).split(".")[0] in OURS)]
        if local:
            raise RemoteCodeError(f"{rel}:{local[0].lineno}: {name} imports from this "
                                  "repository inside a function; import it at the top of "
                                  "the file so the export can ship it")
        for used in _names(node):
            if used in f.defs:
                todo.append((rel, used))
            elif used in f.outside:
                imports.add(f.outside[used])
            elif used in f.ours:
                module, there = f.ours[used]
                target = _module_file(module)
                if target and there:
                    todo.append((target, there))
                elif (module, there) in GLUE:
                    source, deps = GLUE[module, there]
                    glue[there] = source
                    todo.extend(deps)
                else:
                    raise RemoteCodeError(
                        f"{rel}: {name} uses {used!r} from {module}, which is not shipped in "
                        f"{FILE_NAME} (trainer/remote_code.py SOURCES or GLUE)")
    seen: dict[str, str] = {}
    for rel, name in chosen:
        if name in seen and seen[name] != rel:
            raise RemoteCodeError(f"{name!r} is defined by both {seen[name]} and {rel}; "
                                  f"{FILE_NAME} can hold one")
        seen[name] = rel
    return _assemble(files, chosen, glue, imports)


def _assemble(files: dict, chosen: set, glue: dict, imports: set) -> str:
    parts = [f'"""UpCLIP\'s plain CLIP (dense or Mixture-of-Experts) for transformers:\n'
             f'AutoModel.from_pretrained(<export>, trust_remote_code=True).\n\n'
             f'GENERATED by UpCLIP trainer/remote_code.py from {", ".join(SOURCES)};\n'
             f'do not edit (re-export the checkpoint instead)."""',
             "from __future__ import annotations", ""]
    parts += sorted(i for i in imports if i.startswith("import "))
    parts += sorted(i for i in imports if i.startswith("from "))
    parts.append(TRANSFORMERS_IMPORT)
    for rel in SOURCES:
        f = files[rel]
        nodes = sorted({id(f.defs[n]): f.defs[n] for r, n in chosen if r == rel}.values(),
                       key=lambda n: n.lineno)
        if nodes:
            parts.append(f"\n\n# {'-' * 20} {rel}")
        block = True  # a def or class: two blank lines around it (PEP 8)
        for node in nodes:
            text, _ = f.kept(node)
            now = isinstance(node, (ast.FunctionDef, ast.ClassDef))
            parts.append("\n" * (2 if now or block else text.startswith("#")) + text)
            block = now
    if glue:
        parts.append(f"\n\n# {'-' * 20} glue (trainer/remote_code.py GLUE)")
        parts += ["\n\n" + g.strip("\n") for g in glue.values()]
    source = "\n".join(parts) + "\n" + TRANSFORMERS_GLUE
    missing = unresolved(source)
    if missing:
        raise RemoteCodeError(f"{FILE_NAME}: names used but not defined: "
                              f"{', '.join(sorted(missing))}")
    return source


def unresolved(source: str) -> set[str]:
    """Global names that ``source`` reads but neither defines, imports nor gets from
    builtins (a missing definition would otherwise fail only when that line runs)."""
    top = symtable.symtable(source, FILE_NAME, "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    missing: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        for s in table.get_symbols():
            name = s.get_name()
            if (s.is_referenced() and (table is top or s.is_global())
                    and name not in defined and not hasattr(builtins, name)):
                missing.add(name)
        for child in table.get_children():
            walk(child)

    walk(top)
    return missing
