"""Eval sets as the field keeps them, and several per run:

- built-in class names / templates (imagenet, openai_imagenet, simple_imagenet) are
  open_clip.zero_shot_metadata's, and config.py's name tuples list exactly them;
- class names: config > classnames.txt (set folder or one up) > dataset.json; templates:
  config > zeroshot_classification_templates.txt ({c} -> {}) > "a photo of a {}";
- eval.sets parses (named sets, fallbacks to eval.*), bad sets fail with one line naming the
  key; clip_benchmark's nshards.txt split expands to its shards and its errors name the file;
- the training loop's run_eval evaluates every set and logs each under its name (a broken set
  is skipped with an error, the others still run); tools/evaluate.py names a broken set.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import peers
from trainer.config import ConfigError, load_config
from trainer.eval.config import NAMED_CLASSNAMES, NAMED_TEMPLATES

ROOT = Path(__file__).resolve().parents[2]


def cfg_of(*overrides):
    return load_config(None, [f"model.text.vocab_size={peers.VOCAB}", *overrides])


def test_builtin_sets_are_open_clips():
    from open_clip import zero_shot_metadata as meta

    from trainer.eval.names import builtin_classnames, builtin_templates

    assert [builtin_classnames(n) for n in NAMED_CLASSNAMES] == [list(meta.IMAGENET_CLASSNAMES)]
    openai = builtin_templates("openai_imagenet")
    assert len(openai) == 80 and len(builtin_templates("simple_imagenet")) == 7
    for name, table in (("openai_imagenet", meta.OPENAI_IMAGENET_TEMPLATES),
                        ("simple_imagenet", meta.SIMPLE_IMAGENET_TEMPLATES)):
        assert [t.format("goldfish") for t in builtin_templates(name)] == \
            [f("goldfish") for f in table]
    assert set(NAMED_TEMPLATES) == {"openai_imagenet", "simple_imagenet"}


def test_named_sets_from_config_and_command_line(tmp_path):
    from trainer.eval.names import class_names, templates

    cfg = cfg_of("eval.templates=openai_imagenet", "eval.classnames=imagenet",
                 f"data.eval_urls={tmp_path}/x.tar")
    assert cfg.eval.templates == "openai_imagenet" and len(templates(cfg)) == 80
    assert class_names(cfg)[:2] == ["tench", "goldfish"] and len(class_names(cfg)) == 1000
    with pytest.raises(ConfigError) as e:
        cfg_of("eval.classnames=imagenet21k")
    assert str(e.value) == ("eval.classnames expects a list of strings; quote items: "
                            "'eval.classnames=[\"imagenet21k\"]'")


def test_names_and_templates_from_files(tmp_path):
    from trainer.eval.embed import EvalSetError
    from trainer.eval.names import class_names, templates

    split = tmp_path / "root" / "test"
    split.mkdir(parents=True)
    (split / "0.tar").write_bytes(b"")
    cfg = cfg_of(f"data.eval_urls={split / '0.tar'}")
    with pytest.raises(EvalSetError, match="classnames.txt"):
        class_names(cfg)
    assert templates(cfg) == ["a photo of a {}"]
    (split / "dataset.json").write_text(json.dumps({"classnames": ["x", "y"]}))
    assert class_names(cfg) == ["x", "y"]
    (split / "dataset.json").unlink()
    (tmp_path / "root" / "classnames.txt").write_text("cat\n\nsea lion\n")
    (tmp_path / "root" / "zeroshot_classification_templates.txt").write_text(
        "a photo of a {c}.\nart of the {c}\n")
    assert class_names(cfg) == ["cat", "sea lion"]
    assert templates(cfg) == ["a photo of a {}.", "art of the {}"]
    given = cfg_of(f"data.eval_urls={split / '0.tar'}", "eval.classnames=[a, b]",
                   "eval.templates=['{} !']")
    assert class_names(given) == ["a", "b"] and templates(given) == ["{} !"]


def test_eval_sets_config_and_fallbacks(tmp_path):
    from trainer.eval.sets import eval_sets, prefixed

    cfg = cfg_of("data.eval_urls=own.tar", "eval.tasks=[zero_shot, retrieval]",
                 "eval.classnames=[a, b]", "eval.max_batches=3",
                 "eval.sets={imnet: {urls: in/test, classnames: imagenet, "
                 "templates: openai_imagenet, max_batches: 0}, coco: {csv: c.csv, "
                 "tasks: [retrieval]}}")
    sets = eval_sets(cfg)
    assert [s.name for s in sets] == ["", "imnet", "coco"]
    own, imnet, coco = (s.cfg for s in sets)
    assert own.data.eval_urls == "own.tar" and own.eval.sets == {}
    assert imnet.data.eval_urls == "in/test" and imnet.eval.classnames == "imagenet"
    assert imnet.eval.tasks == ["zero_shot", "retrieval"] and imnet.eval.max_batches == 0
    assert coco.eval.csv == "c.csv" and coco.data.eval_urls == "" and coco.eval.tasks == [
        "retrieval"] and coco.eval.classnames == ["a", "b"] and coco.eval.max_batches == 3
    assert prefixed("", {"acc1": 1}) == {"eval/acc1": 1}
    assert prefixed("coco", {"acc1": 1}) == {"eval/coco/acc1": 1}
    assert [s.name for s in eval_sets(cfg_of("eval.sets={a: {urls: x}}"))] == ["a"]


@pytest.mark.parametrize("override, message", [
    ("eval.sets={a: {urls: x, csv: y}}", "eval.sets.a: set exactly one of eval.sets.a.urls "
                                         "and eval.sets.a.csv"),
    ("eval.sets={a: {tasks: [zero_shot]}}", "eval.sets.a: set exactly one of"),
    ("eval.sets={a: {url: x}}", "unknown config key 'eval.sets.a.url'"),
    ("eval.sets={a: {urls: x, tasks: [detect]}}", "eval.sets.a.tasks=['detect']"),
    ("eval.sets={a: {urls: x, templates: [a photo]}}", "eval.sets.a.templates=['a photo']: "
                                                      "each needs a '{}'"),
    ("eval.sets=[a]", "eval.sets=['a']: expected a mapping"),
])
def test_bad_eval_sets_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        cfg_of(override)
    assert str(e.value).startswith(message), str(e.value)


def test_clip_benchmark_split_urls(tmp_path):
    from trainer.data.urls import expand_urls

    split = tmp_path / "test"
    split.mkdir()
    for i in range(3):
        (split / f"{i}.tar").write_bytes(b"")
    (split / "extra.tar").write_bytes(b"")  # not listed by nshards.txt: not read
    (split / "nshards.txt").write_text("3\n")
    assert expand_urls(str(split), "data.eval_urls") == [str(split / f"{i}.tar")
                                                         for i in range(3)]
    (split / "nshards.txt").write_text("4")
    with pytest.raises(FileNotFoundError, match=r"says 4 shards but 1 are missing .*3\.tar"):
        expand_urls(str(split), "data.eval_urls")
    (split / "nshards.txt").write_text("many")
    with pytest.raises(ValueError, match="nshards.txt holds 'many'"):
        expand_urls(str(split), "data.eval_urls")


def test_training_loop_logs_every_set_under_its_name(dist1, tmp_path, caplog):
    from trainer.data import build_tokenizer, sources
    from trainer.data.writer import write_shards
    from trainer.distributed.grads import wrap_ddp
    from trainer.metrics import MetricsLogger
    from trainer.models.build import build_for_training
    from trainer.trainer import Trainer

    (tmp_path / "fm").mkdir()
    write_shards(sources.fashion_mnist("test", count=24), tmp_path / "fm", "fm", 24,
                 info={"classnames": list(sources.FASHION_MNIST_CLASSES)})
    cfg = load_config(None, [
        "model.text.vocab_size=49408", f"data.eval_urls={tmp_path / 'fm'}", "data.workers=0",
        "data.batch_size=8", "data.image_size=32", "data.tokenizer.context_length=16",
        f"eval.sets={{again: {{urls: {tmp_path / 'fm'}, tasks: [zero_shot]}}, "
        f"gone: {{urls: {tmp_path / 'nowhere.tar'}}}}}"])
    torch.manual_seed(0)
    metrics = MetricsLogger(tmp_path / "run", True, 1, 0, tensorboard=False, progress_bar=False)
    fake = SimpleNamespace(ddp=wrap_ddp(build_for_training(cfg, dist1)), cfg=cfg, layout=dist1,
                           tokenizer=build_tokenizer(cfg.data.tokenizer), reporter=True,
                           metrics=metrics, evals=[],
                           log_rank0=lambda level, msg, *a: logging.getLogger("t").log(
                               level, msg, *a))
    with caplog.at_level(logging.ERROR):
        Trainer.run_eval(fake, 7)
    metrics.close()
    assert "eval set 'gone' skipped" in caplog.text and "nowhere.tar" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 7  # one row, every set in it
    row = rows[0]
    assert row["eval/zero_shot_top1"] == row["eval/again/zero_shot_top1"] == row["eval/acc1"]
    assert "eval/image_to_text_r1" in row and "eval/again/image_to_text_r1" not in row
    assert [e.get("set", "") for e in fake.evals] == ["", "again"]


def test_evaluate_cli_names_the_broken_set(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import evaluate as cli

    import dataclasses

    from trainer import hub
    from trainer.config import ModelConfig

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / hub.CONFIG_FILE).write_text(json.dumps({
        "format": hub.FORMAT, "format_version": hub.FORMAT_VERSION,
        "model": dataclasses.asdict(ModelConfig()), "tokenizer": {}}))
    rc = cli.main(["--exported", str(tmp_path / "export"),
                   f"eval.sets={{b: {{urls: {tmp_path / 'missing.tar'}}}}}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: eval.sets.b: data.eval_urls=") and "does not exist" in err[0]
