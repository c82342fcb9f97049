"""What each config key means: docs read from the dataclass source, the key table, and the
resolved config printed as commented YAML (``python -m trainer.train --print-config``).

A field's doc is the comment block directly above it (no blank line between) followed by the
comments on its own line(s)::

    # Negatives from the micro-batches of every data-parallel rank; false: each rank's own.
    global_contrastive: bool = True
    lr_mult_experts: float = 1.0  # expert FFN params learn at lr * this

A comment separated from the field by a blank line is a note about the section, not a doc.
Inherited fields (``VisionConfig`` from ``TowerConfig``) keep the doc of the class that
declares them. No torch import here (the config must fail fast).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator

import yaml


@dataclass(frozen=True)
class KeyInfo:
    key: str             # dotted: "model.vision.image_size"
    type: str            # "int", "list[str]", "float | null"; "section" for a nested dataclass
    default: Any         # the dataclass default (a model preset may replace it)
    doc: str             # one paragraph from the source comments; "" when there is none

    @property
    def is_section(self) -> bool:
        return self.type == "section"


PRAGMAS = ("noqa", "type:", "pragma:", "fmt:")  # tool comments, not docs


@functools.lru_cache(maxsize=None)
def _declared_docs(cls: type) -> dict[str, str]:
    """{field name: doc} for the fields declared in ``cls``'s own class body ({} when its
    source is not available, e.g. a class made at run time: every doc is then empty)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    comments: dict[int, str] = {}
    code: set[int] = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            comments[tok.start[0]] = "" if text.startswith(PRAGMAS) else text
        elif tok.type not in skip:
            code.update(range(tok.start[0], tok.end[0] + 1))
    docs = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, line = [], stmt.lineno - 1
        while line in comments and line not in code:
            above.insert(0, comments[line])
            line -= 1
        own = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
        docs[stmt.target.id] = " ".join(t for t in above + own if t)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """{field name: doc} for every field of dataclass ``cls``, inherited ones included."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base) and base is not object:
            docs.update(_declared_docs(base))
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def _class_doc(cls: type) -> str:
    """The first paragraph of ``cls``'s docstring ("" for dataclass's generated signature)."""
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "section"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list[{type_name(args[0]) if args else 'any'}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def iter_keys(cls: type, prefix: str = "") -> Iterator[KeyInfo]:
    """Every key of dataclass ``cls`` depth-first in declaration order: a section, then its
    keys."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield KeyInfo(key, "section", None, docs[f.name] or _class_doc(tp))
            yield from iter_keys(tp, key + ".")
        else:
            yield KeyInfo(key, type_name(tp), _default(f), docs[f.name])


@functools.lru_cache(maxsize=None)
def key_table(cls: type) -> dict[str, KeyInfo]:
    return {info.key: info for info in iter_keys(cls)}


def did_you_mean(key: str, name: str, here: list[str], root: type) -> list[str]:
    """Likely meant keys for the unknown ``key`` (last part ``name``): close names at the same
    level, then keys of that exact name elsewhere (``train.batch_size`` -> ``data.batch_size``)."""
    parent = key[:-len(name)]
    out = [parent + m for m in difflib.get_close_matches(name, here, n=2, cutoff=0.6)]
    out += [k for k in key_table(root) if k.rsplit(".", 1)[-1] == name and k not in out]
    if not out:
        out = difflib.get_close_matches(key, list(key_table(root)), n=2, cutoff=0.75)
    return out[:3]


# --------------------------------------------------------------------------- YAML printing

def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML flow style (what a user would type after ``key:``);
    dataclass values (the sets of ``eval.sets``) as their fields."""
    value = _plain(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def _comment(text: str, indent: str, width: int = 100) -> list[str]:
    return [f"{indent}# {line}" for line in
            textwrap.wrap(text, width - len(indent) - 2, break_on_hyphens=False)]


def render_yaml(cfg: Any, header: str = "") -> str:
    """The resolved config ``cfg`` as YAML: each key preceded by its type, default and doc as
    comments. Loading the text back (``--config``) gives the same config."""
    lines = _comment(header, "") if header else []
    for info in iter_keys(type(cfg)):
        depth = info.key.count(".")
        indent, name = "  " * depth, info.key.rsplit(".", 1)[-1]
        if info.is_section:
            if depth == 0:
                lines.append("")
            lines += _comment(info.doc, indent)
            lines.append(f"{indent}{name}:")
            continue
        value = get_dotted(cfg, info.key)
        lines += _comment(f"[{info.type}, default {yaml_value(info.default)}] {info.doc}".strip(),
                          indent)
        lines.append(f"{indent}{name}: {yaml_value(value)}")
    return "\n".join(lines) + "\n"


def get_dotted(obj: Any, dotted: str) -> Any:
    """``get_dotted(cfg, "model.vision.width")`` is ``cfg.model.vision.width``."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
