"""Exports (tools/convert_checkpoint.py export, trainer/export.py) and the plain model
(trainer/hub.py), one process, CPU, fp32, against real open_clip and transformers.

The source is an open_clip CLIP with the real CLIP BPE vocabulary (49408 ids, 16-token
context) and every weight perturbed, imported through the CLI. Tolerances:
- open_clip -> UpCLIP -> HF (CLIPModel.from_pretrained) and -> plain model: image and text
  embeddings vs the source open_clip model's, max abs <= 1e-5 (measured 9.5e-7);
- open_clip -> UpCLIP -> open_clip: the reloaded state dict equals the source bit-exact, so
  the embeddings are equal (0.0);
- HF tokenizer files: CLIPTokenizer ids equal trainer/data's up to the end-of-text token,
  exactly; HF's padded ids give the same embeddings (<= 1e-5);
- upcycled MoE (experts equal) -> --merge-experts -> HF, and -> plain MoE model: vs the dense
  source <= 1e-5 (measured 9.5e-7); merged weights equal the experts' mean to 1e-7 (float64
  mean rounded to float32);
- plain MoE model vs UpCLIP's MoE model at tp=1 with random experts (token top-2 with
  dropped routes, top-1 dropless with the CLOC prompter's region embeddings and located
  boxes, image-level routing with drops): <= 1e-5 (measured 1.6e-7 .. 7.2e-7); turning the drops off moves the
  plain model's embeddings by > 1e-4 (measured 2e-3 and 5e-2), so capacity is really tested.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peers
from tools import convert_checkpoint
from trainer import hub
from trainer.models import convert

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a photo of a cat", "Two dogs playing in the snow!", "café crème & naïve résumé",
            "an astronaut riding a horse on the moon, painted in watercolors with great care"]
TOL = 1e-5


def cli(*args):
    convert_checkpoint.main([str(a) for a in args])


def cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        cli(*args)
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(lines) == 1, lines
    return lines[0]


def diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def src(tmp_path_factory, dist1):
    """An open_clip model (real CLIP vocabulary) imported as an UpCLIP checkpoint."""
    import open_clip

    d = tmp_path_factory.mktemp("export")
    cfg = peers.open_clip_config()
    cfg["text_cfg"]["vocab_size"] = 49408
    oc = peers.perturb_(open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]), 3)
    torch.save(oc.state_dict(), d / "oc.pt")
    (d / "oc.json").write_text(json.dumps(cfg))
    cli("import", "--from", "open_clip", "--weights", d / "oc.pt", "--model-config",
        d / "oc.json", "--out", d / "ck")
    from trainer.data.tokenizer import ClipBPETokenizer

    tok = ClipBPETokenizer(context_length=16)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = tok(CAPTIONS)
    return dict(dir=d, ckpt=d / "ck", oc=oc, oc_cfg=cfg, tok=tok, images=images, text=text,
                ref=peers.open_clip_features(oc, images, text))


# --------------------------------------------------------------------------- dense exports

def test_hf_export_model_tokenizer_processor(src):
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    out = src["dir"] / "hf"
    cli("export", "--to", "hf", "--ckpt", src["ckpt"], "--out", out)
    model = CLIPModel.from_pretrained(out).eval()
    got = peers.hf_features(model, src["images"], src["text"])
    assert diff(got, src["ref"]) <= TOL

    hf_tok = CLIPTokenizer.from_pretrained(out)
    assert hf_tok(CAPTIONS, max_length=16, truncation=True)["input_ids"] == [
        list(src["tok"].row_ids(c)) for c in CAPTIONS]
    padded = hf_tok(CAPTIONS, padding="max_length", max_length=16, truncation=True,
                    return_tensors="pt")["input_ids"]
    assert diff(peers.hf_features(model, src["images"], padded)[1:], src["ref"][1:]) <= TOL

    from PIL import Image
    proc = CLIPProcessor.from_pretrained(out)
    batch = proc(images=Image.new("RGB", (48, 40)), text=CAPTIONS[:1], return_tensors="pt")
    assert tuple(batch["pixel_values"].shape) == (1, 3, 32, 32)
    assert (out / "SHA256SUMS").is_file() and not (src["dir"] / "hf.partial").exists()


def test_open_clip_export_both_ways(src):
    import open_clip

    out = src["dir"] / "oc-export"
    cli("export", "--to", "open_clip", "--ckpt", src["ckpt"], "--out", out)
    open_clip.add_model_config(out)
    models = [open_clip.create_model(f"local-dir:{out}"),
              open_clip.create_model("oc-export",
                                     pretrained=str(out / "open_clip_model.safetensors"))]
    want = src["oc"].state_dict()
    for m in models:
        sd = m.state_dict()
        assert set(sd) == set(want) and all(torch.equal(sd[k], want[k]) for k in want)
        assert diff(peers.open_clip_features(m.eval(), src["images"], src["text"]),
                    src["ref"]) == 0.0


def test_plain_model_of_dense_export(src):
    out = src["dir"] / "plain"
    cli("export", "--to", "moe", "--ckpt", src["ckpt"], "--out", out)
    model = hub.load(out)
    with torch.no_grad():
        got = model.encode_image(src["images"]), model.encode_text(src["text"])
        feats = model(src["images"], src["text"])
    assert diff(got, src["ref"]) <= TOL
    assert torch.allclose(feats["logit_scale"], src["oc"].logit_scale.exp())
    assert torch.equal(hub.load_tokenizer(out)(CAPTIONS), src["text"])


# --------------------------------------------------------------------------- MoE

@pytest.fixture(scope="module")
def moe_ckpt(src, dist1):
    """The dense checkpoint upcycled (experts equal) and saved as an MoE checkpoint."""
    from trainer import checkpoint
    from trainer.config import config_from_saved, config_to_dict
    from trainer.upcycle import upcycle_model

    cfg = config_from_saved(checkpoint.read_manifest(src["ckpt"])["config"])
    for tower in (cfg.model.vision, cfg.model.text):
        tower.moe.num_experts, tower.moe.every, tower.moe.capacity_factor = 4, 2, 4.0
        tower.moe.eval_capacity_factor, tower.moe.router_init_std = 4.0, 0.5
    model = upcycle_model(src["ckpt"], cfg, dist1)
    root = src["dir"] / "moe_ck"
    checkpoint.save_checkpoint(root, 0, model, config_to_dict(cfg), dist1)
    return root


def test_moe_export_needs_merge_then_merges_exactly(src, moe_ckpt, capsys):
    from transformers import CLIPModel

    line = cli_error(capsys, "export", "--to", "hf", "--ckpt", moe_ckpt, "--out",
                     src["dir"] / "never")
    assert "an MoE checkpoint (model.vision.moe.num_experts=4)" in line
    assert "--merge-experts" in line and not (src["dir"] / "never").exists()

    cli("export", "--to", "hf", "--merge-experts", "--ckpt", moe_ckpt, "--out",
        src["dir"] / "merged")
    model = CLIPModel.from_pretrained(src["dir"] / "merged").eval()
    assert diff(peers.hf_features(model, src["images"], src["text"]), src["ref"]) <= TOL

    cli("export", "--to", "moe", "--ckpt", moe_ckpt, "--out", src["dir"] / "moe")
    plain = hub.load(src["dir"] / "moe")
    assert sum(isinstance(m, hub.MoEMLP) for m in plain.modules()) == 2
    with torch.no_grad():
        got = plain.encode_image(src["images"]), plain.encode_text(src["text"])
    assert diff(got, src["ref"]) <= TOL  # upcycling preserves the function


def test_merge_experts_is_the_mean(src, moe_ckpt, dist1):
    from trainer import export, reshard

    s = reshard.read_checkpoint(moe_ckpt, dist1)
    mlp = "text.transformer.layers.1.mlp."
    for n in ("w1", "b1", "w2", "b2"):  # experts no longer equal
        s.full[f"{mlp}deepspeed_moe.experts.{n}"].add_(torch.randn_like(
            s.full[f"{mlp}deepspeed_moe.experts.{n}"]) * 0.1)
    merged = export.merge_experts(s, dist1)
    experts = {n: s.full[f"{mlp}deepspeed_moe.experts.{n}"] for n in ("w1", "b1", "w2", "b2")}
    assert torch.allclose(merged.full[mlp + "linear_fc1.weight"], experts["w1"].mean(0).t(),
                          atol=1e-7, rtol=0)
    assert torch.allclose(merged.full[mlp + "linear_fc2.bias"], experts["b2"].mean(0),
                          atol=1e-7, rtol=0)
    assert not any("deepspeed_moe" in k for k in merged.full)
    assert not merged.cfg.model.text.moe.enabled


MOE_CASES = {
    "token_top2_drops": dict(top_k=2, eval_capacity_factor=0.5, min_capacity=1),
    "token_top1_dropless": dict(top_k=1, dispatch="dropless"),
    "image_top2_mean": dict(top_k=2, routing="image", image_router_input="mean",
                            eval_capacity_factor=0.5, min_capacity=1),
}


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_plain_model_routes_like_upclip(case, dist1):
    from trainer.config import load_config
    from trainer.models.state import full_state_dict
    from trainer.models.build import build_for_training

    over = [f"model.text.vocab_size={peers.VOCAB}"]
    for tower in ("vision", "text"):
        moe = dict(MOE_CASES[case], num_experts=4, every=1, router_init_std=0.5)
        if tower == "text":
            moe.pop("routing", None)
        over += [f"model.{tower}.moe.{k}={v}" for k, v in moe.items()]
    if case == "token_top1_dropless":  # with CLOC's prompter and SigLIP's logit bias
        over += ["model.prompter.layers=1", "model.prompter.grounding=true",
                 "model.logit_bias_init=-10.0"]
    cfg = load_config(None, over)
    torch.manual_seed(1)
    model = build_for_training(cfg, dist1).eval()
    plain = hub.UpCLIPModel(cfg.model)
    plain.load_state_dict(convert.to_hub(full_state_dict(model, dist1), cfg.model))
    plain.eval()
    images, text = peers.sample_inputs(n=4)
    with torch.no_grad():
        ref = model.encode_image(images), model.encode_text(text)
        got = plain.encode_image(images), plain.encode_text(text)
        assert diff(got, ref) <= TOL
        if cfg.model.prompter.layers:
            boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.3, 1.0, 0.9]]).expand(4, 2, 4)
            out = model(images, text, boxes, text[:, None].expand(4, 2, -1), ground=True)
            mine = torch.nn.functional.normalize(plain.encode_regions(images, boxes), dim=-1)
            assert diff((mine,), (out["region_features"],)) <= TOL
            located = plain.locate_regions(images, out["region_text_features"])
            assert diff((located,), (out["region_box_pred"],)) <= TOL
            assert torch.equal(plain(images, text)["logit_bias"], out["logit_bias"])
        if "drops" in case or "image" in case:  # the capacity mattered
            stats = [m.pop_stats() for m in model.modules() if hasattr(m, "pop_stats")]
            assert any(s["routes_kept"] < s["routes_wanted"] for s in stats)
            plain.set_dropless(True)
            assert diff((plain.encode_image(images),), ref[:1]) > 1e-4


AUTOMODEL = """
import sys
import torch
from transformers import AutoModel
images, text, boxes = torch.load('inputs.pt')
model = AutoModel.from_pretrained('export', trust_remote_code=True).eval()
assert type(model.clip).__name__ == 'UpCLIPModel', type(model.clip)
with torch.no_grad():
    out = (model.get_image_features(pixel_values=images), model.get_text_features(input_ids=text),
           model.clip.encode_regions(images, boxes), model(images, text)['logit_bias'])
torch.save([t.float() for t in out], 'out.pt')
root, venv = sys.argv[1] + '/', sys.argv[1] + '/.venv/'
files = {n: getattr(m, '__file__', None) or '' for n, m in list(sys.modules.items())}
ours = [n for n, f in files.items() if n.split('.')[0] == 'trainer'
        or (f.startswith(root) and not f.startswith(venv))]
assert not ours, ours  # nothing of UpCLIP: the export's modeling file is all it has
print(type(model).__name__, sum(type(m).__name__ == 'MoEMLP' for m in model.modules()))
"""


def test_transformers_automodel_loads_moe_export(tmp_path, dist1):
    """--to moe: AutoModel.from_pretrained(trust_remote_code=True) in a process with no
    UpCLIP on its path gives the plain MoE CLIP; its image, text and region embeddings equal
    trainer.hub's within 1e-6 (random experts, top-2 with dropped routes, CLOC prompter,
    SigLIP bias); the drops matter (dropless moves them by > 1e-4)."""
    from trainer import checkpoint
    from trainer.config import config_to_dict, load_config
    from trainer.models.build import build_for_training

    over = [f"model.text.vocab_size={peers.VOCAB}", "model.prompter.layers=1",
            "model.logit_bias_init=-10.0"]
    for tower in ("vision", "text"):
        over += [f"model.{tower}.moe.{k}={v}" for k, v in dict(
            MOE_CASES["token_top2_drops"], num_experts=4, every=1, router_init_std=0.5).items()]
    cfg = load_config(None, over)
    torch.manual_seed(2)
    model = build_for_training(cfg, dist1)
    checkpoint.save_checkpoint(tmp_path / "ck", 7, model, config_to_dict(cfg), dist1)
    cli("export", "--to", "moe", "--ckpt", tmp_path / "ck", "--out", tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "upclip" and config["auto_map"]["AutoModel"] == \
        "modeling_upclip.UpCLIPHFModel"
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| step | 7 |" in card and "torch " + torch.__version__ in card
    assert '"num_experts": 4' in card

    images, text = peers.sample_inputs(n=4)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.3, 1.0, 0.9]]).expand(4, 2, 4)
    torch.save([images, text, boxes], tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    p = subprocess.run([sys.executable, "-c", AUTOMODEL, str(ROOT)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-2:] == ["UpCLIPHFModel", "4"], p.stdout  # 2 MoE blocks per tower
    got = torch.load(tmp_path / "out.pt")

    plain = hub.load(tmp_path / "export")
    with torch.no_grad():
        ref = (plain.encode_image(images), plain.encode_text(text),
               plain.encode_regions(images, boxes), plain(images, text)["logit_bias"])
        assert diff(got, ref) <= 1e-6
        plain.set_dropless(True)
        assert diff(got[:1], (plain.encode_image(images),)) > 1e-4


# --------------------------------------------------------------------------- refusals

def test_refuses_to_overwrite_unless_forced(src, capsys):
    out = src["dir"] / "busy"
    out.mkdir()
    (out / "old.txt").write_text("x")
    line = cli_error(capsys, "export", "--to", "moe", "--ckpt", src["ckpt"], "--out", out)
    assert "exists and is not empty" in line and "--force" in line
    cli("export", "--to", "moe", "--ckpt", src["ckpt"], "--out", out, "--force", "--no-check")
    assert not (out / "old.txt").exists() and hub.load(out) is not None


def test_corrupt_checkpoint_names_the_file(src, capsys):
    bad = src["dir"] / "ck_bad"
    shutil.copytree(src["ckpt"], bad)
    shard = sorted((bad / "step_00000000" / "model").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = cli_error(capsys, "export", "--to", "moe", "--ckpt", bad, "--out", src["dir"] / "x")
    assert str(shard) in line and "checksum" in line


def test_checkpoint_keys_that_do_not_fit_are_listed(src, capsys):
    bad = src["dir"] / "ck_keys"
    shutil.copytree(src["ckpt"], bad)
    manifest = bad / "step_00000000" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["config"]["model"]["text"]["layers"] = 3
    m["config"]["model"]["embed_dim"] = 16
    manifest.write_text(json.dumps(m))
    line = cli_error(capsys, "export", "--to", "moe", "--ckpt", bad, "--out", src["dir"] / "y")
    assert "missing: text.transformer.layers.2." in line
    assert "wrongly shaped: text.proj.weight (expected [16, 64], got [32, 64])" in line


def test_import_shape_mismatch_is_listed(src, capsys):
    cfg = dict(src["oc_cfg"], embed_dim=16)
    (src["dir"] / "oc16.json").write_text(json.dumps(cfg))
    line = cli_error(capsys, "import", "--from", "open_clip", "--weights", src["dir"] / "oc.pt",
                     "--model-config", src["dir"] / "oc16.json", "--out", src["dir"] / "z")
    assert "wrongly shaped" in line and "text.proj.weight (expected [16, 64], got [32, 64])" in line


def test_plain_model_load_errors(src):
    from safetensors.torch import load_file, save_file

    out = src["dir"] / "plain_bad"
    cli("export", "--to", "moe", "--ckpt", src["ckpt"], "--out", out, "--no-check")
    weights = out / "model.safetensors"
    sd = load_file(str(weights))
    sd.pop("ln_final.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["text_projection"] = torch.zeros(3, 3)
    save_file(sd, str(weights))
    with pytest.raises(hub.HubError, match="model.safetensors: sha256 does not match"):
        hub.load(out)
    with pytest.raises(hub.HubError) as e:
        hub.load(out, verify=False)
    msg = str(e.value)
    assert "1 missing: ln_final.bias" in msg and "1 unexpected: extra.weight" in msg
    assert "wrongly shaped: text_projection (expected [64, 32], got [3, 3])" in msg


def test_hub_needs_no_distributed_stack(src):
    out = src["dir"] / "plain"
    if not out.exists():
        cli("export", "--to", "moe", "--ckpt", src["ckpt"], "--out", out)
    code = f"""
import sys
class Block:
    def find_spec(self, name, *a):
        if name.split('.')[0] in ('megatron', 'deepspeed'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import torch, torch.distributed as dist
from trainer import hub
m = hub.load({str(out)!r})
e = m.encode_text(hub.load_tokenizer({str(out)!r})(['a cat']))
assert e.shape == (1, 32) and not dist.is_initialized()
assert not any(k.split('.')[0] in ('megatron', 'deepspeed') for k in sys.modules)
print('ok')
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


# --------------------------------------------------------------------------- small pieces

def test_help_documents_every_subcommand(capsys):
    p = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--help"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0
    for needle in ("import", "export --to hf", "--to open_clip", "--to moe", "--merge-experts",
                   "reshard", "torchrun", "trainer.hub.load", "local-dir:", "--force"):
        assert needle in p.stdout, needle
    for sub, flags in (("import", ("--from", "--weights", "--model-config", "--out", "--force")),
                       ("export", ("--to", "--ckpt", "--out", "--merge-experts", "--dtype",
                                   "--name", "--no-check", "--force", "lossy")),
                       ("reshard", ("--ckpt", "--out", "--tp", "--pp", "--ep", "--force",
                                    "torchrun"))):
        with pytest.raises(SystemExit):
            cli(sub, "--help")
        text = capsys.readouterr().out
        assert all(f in text for f in flags), (sub, text)


def test_config_round_trips():
    from trainer.config import ModelConfig

    cfg = convert.config_from_open_clip(peers.open_clip_config(quick_gelu=True))
    assert convert.config_from_hf(convert.config_to_hf(cfg)) == cfg
    assert convert.config_from_open_clip(convert.config_to_open_clip(cfg)) == cfg
    cfg.text.eot_token_id = 7  # not the largest id: open_clip must pool at the eos id
    oc = convert.config_to_open_clip(cfg)
    assert oc["text_cfg"]["pool_type"] == "eos" and oc["text_cfg"]["eos_id"] == 7
    assert convert.config_from_open_clip(oc) == cfg
    moe = ModelConfig(preset="")
    moe.vision.moe.num_experts = 4
    with pytest.raises(ValueError, match="model.vision.moe.num_experts=4"):
        convert.config_to_hf(moe)


def test_mismatch_report_lists_everything():
    expected = {f"k{i}": (2,) for i in range(8)}
    got = {"k0": (2,), "k1": (3,), "x": (1,)}
    msg = hub.mismatch_report(expected, got)
    assert msg.startswith("6 missing: k2, k3, k4, k5, k6, ... 1 more; 1 unexpected: x; ")
    assert msg.endswith("1 wrongly shaped: k1 (expected [2], got [3])")
    assert hub.mismatch_report(got, dict(got)) == ""


def test_modeling_file_generator_refuses_what_it_cannot_ship(monkeypatch):
    """trainer/remote_code.py: a name from an unshipped module, a function-local import of
    this repository, and an undefined global are errors at generation, not at load."""
    from trainer import remote_code as rc

    source = rc.modeling_source()
    assert not rc.unresolved(source) and "import trainer" not in source
    assert rc.unresolved(source + "\ndef f():\n    return undefined_name\n") == {"undefined_name"}
    monkeypatch.setattr(rc, "ROOTS", rc.ROOTS + (("trainer/hub.py", "verify_checksums"),))
    with pytest.raises(rc.RemoteCodeError, match="uses 'sha256' from trainer.io, which is not "
                                                  "shipped"):
        rc.modeling_source()
    monkeypatch.setattr(rc, "ROOTS", (("trainer/hub.py", "load_tokenizer"),))
    with pytest.raises(rc.RemoteCodeError, match="load_tokenizer imports from this repository "
                                                  "inside a function"):
        rc.modeling_source()
