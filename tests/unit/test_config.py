import pytest

from trainer.config import ConfigError, load_config, parse_overrides


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_yaml_overrides_order(tmp_path):
    p = write(tmp_path, "train:\n  lr: 0.5\n  steps: 3\nmodel:\n  preset: vit-b-16\n")
    cfg = load_config(p, ["train.lr=0.25", "model.vision.layers=6"])
    assert cfg.train.lr == 0.25           # override beats YAML
    assert cfg.train.steps == 3           # YAML beats default
    assert cfg.train.micro_batch_size == 8  # default
    assert cfg.model.vision.patch_size == 16 and cfg.model.vision.width == 768  # preset
    assert cfg.model.vision.layers == 6   # field beside a preset beats it


@pytest.mark.parametrize("preset,width,layers,patch,embed", [
    ("vit-b-32", 768, 12, 32, 512), ("vit-b-16", 768, 12, 16, 512),
    ("vit-l-14", 1024, 24, 14, 768), ("tiny", 64, 2, 8, 32)])
def test_presets(preset, width, layers, patch, embed):
    cfg = load_config(None, [f"model.preset={preset}"])
    v = cfg.model.vision
    assert (v.width, v.layers, v.patch_size, cfg.model.embed_dim) == (width, layers, patch, embed)


@pytest.mark.parametrize("overrides,needle", [
    (["model.vison.width=3"], "unknown config key 'model.vison'"),
    (["train.lr=abc"], "train.lr='abc': expected float"),
    (["train.steps=1.5"], "train.steps=1.5: expected int"),
    (["train.steps=0"], "train.steps=0 must be > 0"),
    (["model.vision.act=relu"], "model.vision.act='relu'"),
    (["model.vision.width=65"], "model.vision.width=65 is not divisible by model.vision.heads=4"),
    (["model.preset=vit-h"], "model.preset='vit-h'"),
    (["model.attention=flash"], "model.attention='flash': expected one of sdpa, unfused"),
    (["parallel.tp=3"], "model.vision.heads=4 is not divisible by parallel.tp=3"),
    (["parallel.pp=3"], "cannot be split over parallel.pp=3"),
    (["checkpoint.load=/nonexistent/ckpt"], "checkpoint.load='/nonexistent/ckpt'"),
    (["noequals"], "not of the form key.sub=value"),
])
def test_errors_name_key_and_value(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"line \d+: not valid YAML"):
        load_config(write(tmp_path, "train:\n  lr: [1,\n"))
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(write(tmp_path, "trian: {}\n"))


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "a.c=0.5", "d=true", "e=x y"]) == {
        "a": {"b": 1, "c": 0.5}, "d": True, "e": "x y"}


def test_shipped_configs_load():
    from pathlib import Path
    for path in sorted(Path(__file__).resolve().parents[2].glob("configs/*.yaml")):
        load_config(path)


def test_data_section_errors_name_key():
    with pytest.raises(ConfigError, match="data.batch_size=0 must be > 0"):
        load_config(None, ["data.batch_size=0"])
    with pytest.raises(ConfigError, match="data.tokenizer.context_length=77 and "
                                          "model.text.context_length=16 are both set and differ"):
        load_config(None, ["data.train_urls=/x/{000..001}.tar",
                           "data.tokenizer.context_length=77", "model.text.context_length=16"])


def test_float_without_dot():
    """YAML 1.1 reads 1e-4 as a string; float fields accept it (users write lr=1e-4)."""
    cfg = load_config(None, ["train.lr=1e-4", "train.eps=2E-8"])
    assert cfg.train.lr == 1e-4 and cfg.train.eps == 2e-8
    with pytest.raises(ConfigError, match="train.lr='fast': expected float"):
        load_config(None, ["train.lr=fast"])


def test_activation_names_are_the_kernels_table():
    """config keeps its own names tuple (kernels imports torch; config must not): the same
    names as kernels' activation table."""
    from kernels.activations import ACTIVATIONS as KERNEL_ACTIVATIONS
    from trainer.config import ACTIVATIONS

    assert ACTIVATIONS == KERNEL_ACTIVATIONS


def test_expert_backend_names_are_the_kernels_backends():
    """trainer/moe/config.py keeps its own tuple (no torch import there): kernels' names."""
    import kernels
    from trainer.moe.config import EXPERT_BACKENDS

    assert EXPERT_BACKENDS == kernels.BACKENDS


def test_list_override_with_braces_and_spaces_parses():
    cfg = load_config(overrides=['eval.templates=["a photo of a {}", "a {}"]'])
    assert cfg.eval.templates == ["a photo of a {}", "a {}"]


@pytest.mark.parametrize("text, example", [
    ("[a photo of a {}]", '["a photo of a {}"]'),
    ("[a photo of a {}, a {}]", '["a photo of a {}", "a {}"]'),
    ("a photo of a {}", '["a photo of a {}"]'),
    ("[{}]", '["..."]'),
])
def test_unquoted_list_override_error_shows_quoting(text, example):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"eval.templates={text}"])
    assert str(e.value) == (f"eval.templates expects a list of strings; quote items: "
                            f"'eval.templates={example}'")


def test_cloc_grounding_errors_name_the_fields():
    with pytest.raises(ConfigError, match=r"train.grounding_loss_weight=0.5 needs "
                                          r"model.prompter.layers > 0 \(is 1\) and "
                                          r"model.prompter.grounding=true \(is false\)"):
        load_config(None, ["model.prompter.layers=1", "train.grounding_loss_weight=0.5"])
    with pytest.raises(ConfigError, match="model.prompter.grounding=true needs "
                                          "model.prompter.layers > 0"):
        load_config(None, ["model.prompter.grounding=true"])
    with pytest.raises(ConfigError, match="grounding_giou_weight and grounding_l2_weight are "
                                          "all 0"):
        load_config(None, ["model.prompter.layers=1", "model.prompter.grounding=true",
                           "train.grounding_loss_weight=1", "train.grounding_l1_weight=0",
                           "train.grounding_giou_weight=0"])
    with pytest.raises(ConfigError, match="train.grounding_giou_weight=-1.0 must be >= 0"):
        load_config(None, ["train.grounding_giou_weight=-1"])
    cfg = load_config(None, ["model.prompter.layers=1", "model.prompter.grounding=true",
                             "train.grounding_loss_weight=1"])
    assert cfg.train.region_dedupe_captions is True and cfg.train.grounding_l1_weight == 5.0
