"""The ``eval`` section of the run config: the run's own eval set and the named sets of
``eval.sets`` (trainer/eval/sets.py), built-in class names and templates (trainer/eval/names.py).
Config layer: no torch."""
from __future__ import annotations

from dataclasses import dataclass, field

from trainer.config_base import ConfigError, quoted_list_example


# Built-in class-name and template sets (trainer/eval/names.py takes them from
# open_clip.zero_shot_metadata at run time; this module imports no open_clip). A unit test
# keeps the two equal.
NAMED_CLASSNAMES = ("imagenet",)
NAMED_TEMPLATES = ("openai_imagenet", "simple_imagenet")
EVAL_TASKS = ("zero_shot", "retrieval", "regions")


def check_named(key: str, value: list[str] | str, names: tuple[str, ...]) -> None:
    """A string must be one of ``names`` (a built-in set); anything else reads like an
    unquoted list."""
    if isinstance(value, str) and value not in names:
        raise ConfigError(f"{key} expects a list of strings; quote items: "
                          f"'{key}={quoted_list_example(value)}'")


def check_templates(key: str, templates: list[str] | str) -> None:
    check_named(key, templates, NAMED_TEMPLATES)
    if isinstance(templates, list) and any("{}" not in t and "{c}" not in t for t in templates):
        raise ConfigError(f"{key}={templates!r}: each needs a '{{}}' (or clip_benchmark's "
                          "'{c}') where the class name goes")


@dataclass
class EvalSetConfig:
    """One named eval set of ``eval.sets``. Empty fields fall back to ``eval.*``, then to the
    files beside the set (see EvalConfig)."""
    urls: str = ""          # WebDataset shards (any data.eval_urls spec, clip_benchmark's dir)
    csv: str = ""           # or a CSV set (as eval.csv)
    csv_image_key: str = "filepath"  # the CSV's image path column (as eval.csv_image_key)
    csv_caption_key: str = "title"   # the CSV's caption column (as eval.csv_caption_key)
    csv_label_key: str = ""          # the CSV's class label column; empty: none
    tasks: list[str] = field(default_factory=list)           # empty: eval.tasks
    classnames: list[str] | str = field(default_factory=list)  # empty: eval.classnames
    templates: list[str] | str = field(default_factory=list)   # empty: eval.templates
    max_batches: int = -1   # -1: eval.max_batches

    def validate(self, key: str) -> None:
        if bool(self.urls) == bool(self.csv):
            raise ConfigError(f"{key}: set exactly one of {key}.urls and {key}.csv")
        if any(t not in EVAL_TASKS for t in self.tasks):
            raise ConfigError(f"{key}.tasks={self.tasks!r}: each must be one of {EVAL_TASKS}")
        check_named(f"{key}.classnames", self.classnames, NAMED_CLASSNAMES)
        check_templates(f"{key}.templates", self.templates)
        if self.max_batches < -1:
            raise ConfigError(f"{key}.max_batches={self.max_batches} must be >= -1")


@dataclass
class EvalConfig:
    """Zero-shot classification, image-text retrieval and CLOC region retrieval on the eval
    set (data.eval_urls shards, or eval.csv) and on the named sets of eval.sets; see
    trainer/eval/__init__.py and trainer/eval/sets.py."""
    every: int = 0          # steps between evaluations (0: only before and after training)
    # What to compute; each runs when the data supports it (zero_shot: class labels,
    # regions: region boxes and model.prompter.layers > 0).
    tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))
    # A CSV eval set instead of data.eval_urls (tab-separated if it ends in .tsv): one row per
    # (image, caption), image paths relative to the CSV's folder; the label column is optional.
    csv: str = ""
    csv_image_key: str = "filepath"  # eval.csv column with the image path
    csv_caption_key: str = "title"   # eval.csv column with the caption
    csv_label_key: str = ""          # eval.csv column with the class label; empty: none
    # Class names in label order, or a built-in set (imagenet). Empty: classnames.txt (one per
    # line; clip_benchmark's) beside the shards or one folder up, else `classnames` of the
    # dataset.json that tools/make_shards.py writes beside them.
    classnames: list[str] | str = field(default_factory=list)
    # Prompt templates ("a photo of a {}"; clip_benchmark's "{c}" works too), or a built-in
    # set (openai_imagenet: OpenAI's 80, simple_imagenet). Empty:
    # zeroshot_classification_templates.txt beside the shards or one folder up, else
    # ["a photo of a {}"].
    templates: list[str] | str = field(default_factory=list)
    max_batches: int = 0    # per rank; 0: the whole split
    # Further eval sets, each evaluated and logged under its name (eval/<name>/<metric>):
    # {name: {urls | csv, tasks, classnames, templates, ...}} (EvalSetConfig).
    sets: dict[str, EvalSetConfig] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        for name in ("every", "max_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be >= 0")
        check_templates(f"{key}.templates", self.templates)
        check_named(f"{key}.classnames", self.classnames, NAMED_CLASSNAMES)
        if any(t not in EVAL_TASKS for t in self.tasks):
            raise ConfigError(f"{key}.tasks={self.tasks!r}: each must be one of {EVAL_TASKS}")
        if self.csv and not (self.csv_image_key and self.csv_caption_key):
            raise ConfigError(f"{key}.csv is set: {key}.csv_image_key and {key}.csv_caption_key "
                              "must name its columns")
        for name, s in self.sets.items():
            if not name or "/" in name:
                raise ConfigError(f"{key}.sets: set name {name!r} must be non-empty, without '/'")
            s.validate(f"{key}.sets.{name}")
