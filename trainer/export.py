"""Exporting UpCLIP training checkpoints (tools/convert_checkpoint.py).

    src = read_checkpoint(path, layout)         # trainer/reshard.py; collective
    src = merge_experts(src, layout)            # MoE -> dense by averaging the experts (lossy)
    write_export(src, "hf" | "open_clip" | "moe", out)      # one process (rank 0)

An export is written into ``<out>.partial``: the files, then ``SHA256SUMS``; the weights are
read back and compared tensor by tensor (names, shapes, bits); the directory is reloaded with
its own library (transformers ``CLIPModel``, ``open_clip.create_model``, ``trainer.hub.load``)
and its image and text embeddings are compared with UpCLIP's on random inputs. Only then is it
renamed to ``<out>`` (an older export there is replaced only with ``force``).

``merge_experts`` turns each MoE MLP into one dense MLP whose weights and biases are the
experts' means (computed in float64). It is exact while the experts are equal (right after
upcycling); after training, the mean of the weights is neither the mean of the experts'
outputs nor the routed mixture, so the merged model only approximates the MoE model (the
export logs how far the embeddings moved).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from trainer.config import Config, ModelConfig
from trainer.distributed.layout import ParallelLayout
from trainer.hub import (CHECKSUMS_FILE, CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE,
                         mismatch_report)
from trainer import remote_code
from trainer.io import sha256
from trainer.model_card import model_card
from trainer.models import convert
from trainer.models.build import build_model
from trainer.moe import names
from trainer.moe.upcycle import dense_config
from trainer.reshard import Source

log = logging.getLogger("upclip")

TARGETS = ("hf", "open_clip", "moe")
HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL codes, as HF stores them


class ExportError(RuntimeError):
    """One line naming the file (or field) and what is wrong."""


def progress(iterable, total: int | None = None, desc: str = "", unit: str = "it"):
    """tqdm on a terminal (stderr), silent otherwise."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                disable=None, leave=False)


def is_moe(model_cfg: ModelConfig) -> bool:
    return model_cfg.vision.moe.enabled or model_cfg.text.moe.enabled


def merge_experts(src: Source, layout: ParallelLayout) -> Source:
    """Each MoE MLP -> a dense MLP with the experts' mean weights and biases (lossy, see the
    module docstring); routers are dropped."""
    out = dict(src.full)
    for mlp in names.moe_mlp_prefixes(src.cfg.model):
        out.pop(names.router_key(mlp))
        mean = {n: out.pop(names.expert_key(mlp, n)).double().mean(0)
                .to(src.full[names.expert_key(mlp, n)].dtype) for n in names.EXPERT_TENSORS}
        out[mlp + names.FC1_WEIGHT] = mean["w1"].t().contiguous()  # [f, d]
        out[mlp + names.FC1_BIAS] = mean["b1"]
        out[mlp + names.FC2_WEIGHT] = mean["w2"].t().contiguous()  # [d, f]
        out[mlp + names.FC2_BIAS] = mean["b2"]
    cfg = copy.deepcopy(src.cfg)
    cfg.model = dense_config(src.cfg.model)
    return Source(src.path, src.manifest, cfg, out,
                  build_model(cfg.model, layout, inference=True, full=out), merged_from=src.model)


# --------------------------------------------------------------------------- files

class Directory:
    """An export being written in ``<out>.partial``; ``commit`` renames it to ``<out>``."""

    def __init__(self, out: Path, force: bool):
        self.out, self.force = out, force
        self.path = out.with_name(out.name + ".partial")
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}

    def json(self, name: str, obj: dict) -> None:
        (self.path / name).write_text(json.dumps(obj, indent=2) + "\n")

    def safetensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file
        save_file(tensors, str(self.path / name), metadata={"format": "pt"})
        self.tensors[name] = tensors

    def verify(self) -> None:
        """Every weight file read back equal to what was meant (names, shapes, bits)."""
        from safetensors import safe_open

        for name, meant in self.tensors.items():
            path = self.path / name
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                report = mismatch_report({k: tuple(v.shape) for k, v in meant.items()}, shapes)
                if report:
                    raise ExportError(f"{path}: read back wrong: {report}")
                total = sum(v.numel() * v.element_size() for v in meant.values())
                bar = progress(None, total=total, desc=f"verify {name}", unit="B")
                for k, v in meant.items():
                    if not torch.equal(f.get_tensor(k), v):
                        raise ExportError(f"{path}: tensor {k} reads back different")
                    bar.update(v.numel() * v.element_size())
                bar.close()

    def write_checksums(self) -> None:
        files = sorted(p for p in self.path.rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files)
        bar = progress(None, total=total, desc="sha256", unit="B")
        lines = []
        for p in files:
            lines.append(f"{sha256(p)}  {p.relative_to(self.path)}\n")
            bar.update(p.stat().st_size)
        bar.close()
        (self.path / CHECKSUMS_FILE).write_text("".join(lines))

    def commit(self) -> Path:
        old = self.out.with_name(self.out.name + ".old")
        if self.out.exists():
            if not self.force and (not self.out.is_dir() or any(self.out.iterdir())):
                raise ExportError(f"{self.out} exists and is not empty (--force replaces it)")
            os.replace(self.out, old)
        os.replace(self.path, self.out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists():
            old.unlink()
        return self.out


def preprocess(cfg: Config) -> dict:
    a = cfg.data.augment
    return {"image_size": cfg.model.vision.image_size, "mean": list(a.mean), "std": list(a.std),
            "interpolation": a.interpolation, "resize_mode": "shortest"}


def write_clip_tokenizer(directory: Path, context_length: int) -> None:
    """vocab.json + merges.txt (+ configs) of the CLIP BPE vocabulary, as Hugging Face's CLIP
    conversion writes them: ``transformers.CLIPTokenizer`` then gives trainer/data's ids up
    to the end-of-text token (HF pads with <|endoftext|>, our tokenizer with 0; the text
    tower never reads past the first end-of-text)."""
    import gzip

    from trainer.data.tokenizer import ClipBPETokenizer, clip_vocab_path

    tok = ClipBPETokenizer(context_length=context_length)
    vocab = {HF_SPECIAL.get(t, t): i for t, i in tok.encoder.items()}
    num_merges = tok.vocab_size - 2 * 256 - 2
    with gzip.open(clip_vocab_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:1 + num_merges]
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps(dict(
        special, tokenizer_class="CLIPTokenizer", model_max_length=context_length,
        do_lower_case=True, errors="replace", clean_up_tokenization_spaces=False), indent=2))


def hf_preprocessor(cfg: Config) -> dict:
    p = preprocess(cfg)
    s = p["image_size"]
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
            "do_resize": True, "size": {"shortest_edge": s},
            "resample": RESAMPLE[p["interpolation"]],
            "do_center_crop": True, "crop_size": {"height": s, "width": s},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": p["mean"], "image_std": p["std"], "do_convert_rgb": True}


def _cast(tensors: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _write_hf(src: Source, d: Directory, dtype: torch.dtype) -> list[str]:
    m, notes = src.cfg.model, []
    d.json(CONFIG_FILE, convert.config_to_hf(m))
    d.safetensors(WEIGHTS_FILE, _cast(convert.to_hf(src.full, m), dtype))
    d.json("preprocessor_config.json", hf_preprocessor(src.cfg))
    tok = src.cfg.data.tokenizer
    if tok.kind == "clip_bpe" and m.text.vocab_size == 49408:
        write_clip_tokenizer(d.path, m.text.context_length)
    else:
        notes.append(f"no tokenizer files: data.tokenizer.kind={tok.kind!r}, "
                     f"model.text.vocab_size={m.text.vocab_size} is not the CLIP BPE vocabulary")
    return notes


def _write_open_clip(src: Source, d: Directory, dtype: torch.dtype, name: str) -> list[str]:
    oc_cfg = convert.config_to_open_clip(src.cfg.model)
    p = preprocess(src.cfg)
    d.json("open_clip_config.json", {"model_cfg": oc_cfg, "preprocess_cfg": {
        "size": p["image_size"], "mode": "RGB", "mean": p["mean"], "std": p["std"],
        "interpolation": p["interpolation"], "resize_mode": p["resize_mode"]}})
    d.json(f"{name}.json", oc_cfg)  # open_clip.add_model_config(<out>) registers `name`
    d.safetensors("open_clip_model.safetensors",
                  _cast(convert.to_open_clip(src.full, src.cfg.model), dtype))
    return []


def _write_moe(src: Source, d: Directory, dtype: torch.dtype) -> list[str]:
    tok = dataclasses.asdict(src.cfg.data.tokenizer)
    notes = []
    if tok["kind"] == "sentencepiece":
        model_file = Path(tok["model_path"])
        if model_file.is_file():
            shutil.copy(model_file, d.path / model_file.name)
        else:
            notes.append(f"data.tokenizer.model_path={tok['model_path']!r} not found: copy it "
                         f"beside {CONFIG_FILE} for trainer.hub.load_tokenizer")
    source = {"checkpoint": str(src.path), "step": src.manifest["step"],
              "merged_experts": src.merged_from is not None}
    p = preprocess(src.cfg)
    d.json(CONFIG_FILE, {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(src.cfg.model), "tokenizer": tok,
        "preprocess": p, "weights": WEIGHTS_FILE, "source": source,
        # transformers: AutoModel.from_pretrained(<out>, trust_remote_code=True)
        "model_type": remote_code.MODEL_TYPE, "architectures": [remote_code.MODEL_CLASS],
        "auto_map": remote_code.AUTO_MAP, "dtype": str(dtype).removeprefix("torch.")})
    (d.path / remote_code.FILE_NAME).write_text(remote_code.modeling_source())
    (d.path / "README.md").write_text(
        model_card(src.cfg, src.manifest, source, p))
    d.safetensors(WEIGHTS_FILE, _cast(convert.to_hub(src.full, src.cfg.model), dtype))
    return notes


# --------------------------------------------------------------------------- checking

def check_inputs(model_cfg: ModelConfig, n: int = 2, seed: int = 0):
    """Random images and token rows with one end-of-text token each."""
    g = torch.Generator().manual_seed(seed)
    v, t = model_cfg.vision, model_cfg.text
    images = torch.randn(n, 3, v.image_size, v.image_size, generator=g)
    text = torch.randint(0, t.vocab_size - 1, (n, t.context_length), generator=g)
    text = text + (text >= t.eot_id).long()  # any id but the end-of-text
    for i, end in enumerate(torch.randint(1, t.context_length, (n,), generator=g).tolist()):
        text[i, end], text[i, end + 1:] = t.eot_id, 0
    return images, text


def embeddings(model, images, text, hf: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        if hf:
            img = model.get_image_features(pixel_values=images)
            txt = model.get_text_features(input_ids=text)
            return (getattr(img, "pooler_output", img).float(),
                    getattr(txt, "pooler_output", txt).float())
        return model.encode_image(images).float(), model.encode_text(text).float()


def load_peer(target: str, directory: Path):
    """The export as its library loads it, in float32 (errors: one line)."""
    if target == "hf":
        from transformers import CLIPModel
        model, info = CLIPModel.from_pretrained(str(directory), dtype=torch.float32,
                                                output_loading_info=True)
        wrong = {k: v for k, v in info.items() if v and k != "error_msgs"}
        if wrong:
            raise ExportError(f"{directory}: transformers CLIPModel loads it with {wrong}")
        return model.eval()
    if target == "open_clip":
        import open_clip
        try:
            return open_clip.create_model(f"local-dir:{directory}").eval()
        except RuntimeError as e:
            raise ExportError(f"{directory}: open_clip.create_model: "
                              f"{str(e).splitlines()[0]}") from None
    from trainer import hub
    return hub.load(directory)


def max_diff(a: tuple, b: tuple) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def check_export(src: Source, target: str, directory: Path, tol: float) -> float:
    """Peer embeddings vs UpCLIP's; returns the max abs difference (raises above ``tol`` x
    max(1, max |embedding|))."""
    images, text = check_inputs(src.cfg.model)
    ref = embeddings(src.model, images, text)
    got = embeddings(load_peer(target, directory), images, text, hf=target == "hf")
    diff = max_diff(ref, got)
    scale = max(1.0, max(float(r.abs().max()) for r in ref))
    if not diff <= tol * scale:
        raise ExportError(f"{directory}: {target} embeddings differ from UpCLIP's by {diff:.3g}"
                          f" (> {tol:g} x {scale:.3g})")
    if src.merged_from is not None:
        moved = max_diff(embeddings(src.merged_from, images, text), ref)
        log.info("merged experts: embeddings moved by %.3g (max abs) from the MoE model's",
                 moved)
    return diff


def write_export(src: Source, target: str, out: Path, force: bool = False,
                 dtype: torch.dtype = torch.float32, name: str = "", check: bool = True,
                 tol: float | None = None) -> tuple[Path, list[str]]:
    """One process. Writes, verifies and (``check``) reloads the export; returns the
    directory and notes on what was left out."""
    if target != "moe" and is_moe(src.cfg.model):
        raise ExportError(f"{src.path}: an MoE checkpoint; --to {target} needs "
                          f"--merge-experts (lossy: averages the experts) or use --to moe")
    d = Directory(out, force)
    if target == "hf":
        notes = _write_hf(src, d, dtype)
    elif target == "open_clip":
        notes = _write_open_clip(src, d, dtype, name or out.name)
    else:
        notes = _write_moe(src, d, dtype)
    if target != "moe":
        left = convert.not_exported(src.full, target)
        if left:
            notes.append(f"not exported ({target} has no place for them; embeddings are "
                         f"unaffected): {', '.join(left[:3])}{' ...' if len(left) > 3 else ''}")
    d.write_checksums()
    d.verify()
    if check:
        tol = tol if tol is not None else (1e-4 if dtype == torch.float32 else 5e-2)
        diff = check_export(src, target, d.path, tol)
        log.info("checked: %s embeddings of the export equal UpCLIP's to %.2g", target, diff)
    return d.commit(), notes
