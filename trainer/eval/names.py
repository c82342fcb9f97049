"""Class names and prompt templates of an eval set, wherever the field keeps them.

    names = class_names(cfg)     # eval.classnames > classnames.txt > dataset.json
    temps = templates(cfg)       # eval.templates > zeroshot_classification_templates.txt > default

``eval.classnames`` / ``eval.templates`` may name a built-in set (``imagenet``;
``openai_imagenet``: OpenAI's 80 templates, ``simple_imagenet``: its 7-template subset), taken
from ``open_clip.zero_shot_metadata`` at run time. The files are looked for in the eval set's
folder (the folder of its first shard or of the CSV) and one folder up: clip_benchmark keeps
``classnames.txt`` and ``zeroshot_classification_templates.txt`` in the dataset root, above
its ``test/`` split; tools/make_shards.py writes ``dataset.json`` beside the shards.
Templates may use ``{}`` or clip_benchmark's ``{c}`` for the class name.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from trainer.config import Config
from trainer.eval.embed import EvalSetError

DEFAULT_TEMPLATES = ["a photo of a {}"]
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


def builtin_classnames(name: str) -> list[str]:
    """A built-in class-name list (trainer/eval/config.py NAMED_CLASSNAMES)."""
    from open_clip import zero_shot_metadata as meta

    table = {"imagenet": meta.IMAGENET_CLASSNAMES}
    return list(table[name])


def builtin_templates(name: str) -> list[str]:
    """A built-in template list (trainer/eval/config.py NAMED_TEMPLATES) as ``{}`` format strings."""
    from open_clip import zero_shot_metadata as meta

    table = {"openai_imagenet": meta.OPENAI_IMAGENET_TEMPLATES,
             "simple_imagenet": meta.SIMPLE_IMAGENET_TEMPLATES}
    return [t("{}") for t in table[name]]  # open_clip keeps them as lambdas c -> prompt


def set_folders(cfg: Config) -> list[Path]:
    """The eval set's folder and its parent (where its metadata files may be)."""
    if cfg.eval.csv:
        here = Path(cfg.eval.csv).resolve().parent
    else:
        from trainer.data.urls import expand_urls, is_remote

        first = expand_urls(cfg.data.eval_urls, "data.eval_urls")[0]
        if is_remote(first):
            return []
        here = Path(re.sub(r"^file:(//)?", "", first)).resolve().parent
    return [here, here.parent]


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def class_names(cfg: Config) -> list[str]:
    """``eval.classnames`` (a list or a built-in name), else ``classnames.txt`` (one per line,
    label order), else ``classnames`` of ``dataset.json``, in the set's folder or one up."""
    given = cfg.eval.classnames
    if isinstance(given, str):
        return builtin_classnames(given)
    if given:
        return list(given)
    folders = set_folders(cfg)
    for folder in folders:
        if (folder / CLASSNAMES_FILE).is_file():
            return _lines(folder / CLASSNAMES_FILE)
        meta = folder / "dataset.json"
        try:
            names = json.loads(meta.read_text()).get("classnames")
        except (OSError, json.JSONDecodeError, AttributeError):
            names = None
        if names:
            return list(names)
    where = " or ".join(str(f) for f in folders) or "the (remote) eval set"
    raise EvalSetError(f"eval.classnames is empty and neither {CLASSNAMES_FILE} nor a "
                       f"dataset.json with classnames is in {where}: set eval.classnames "
                       "(a list, or imagenet) or eval.tasks without zero_shot")


def templates(cfg: Config) -> list[str]:
    """``eval.templates`` (a list or a built-in name), else
    ``zeroshot_classification_templates.txt`` in the set's folder or one up, else
    ``["a photo of a {}"]``; ``{c}`` rewritten to ``{}``."""
    given = cfg.eval.templates
    if isinstance(given, str):
        found = builtin_templates(given)
    elif given:
        found = list(given)
    else:
        files = [f / TEMPLATES_FILE for f in set_folders(cfg) if (f / TEMPLATES_FILE).is_file()]
        found = _lines(files[0]) if files else list(DEFAULT_TEMPLATES)
    return [t.replace("{c}", "{}") for t in found]

