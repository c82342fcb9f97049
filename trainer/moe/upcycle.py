"""Sparse upcycling (CLIP-UP): a dense CLIP checkpoint -> an MoE CLIP, by config.

Every MLP that ``model.{vision,text}.moe`` selects becomes ``num_experts`` exact copies of the
dense MLP (fc1 and fc2, biases included) plus a router (zeros or small normal, per config);
every other weight is copied. With the router's top-k weights renormalised and no token
dropped, the upcycled model computes what the dense one did.

    torchrun --nproc_per_node=2 -m trainer.moe.upcycle --dense CKPT --out DIR \\
        --config configs/X.yaml model.vision.moe.num_experts=4 model.vision.moe.every=2 ...

works on our training checkpoints and on imported open_clip / HF / OpenAI weights
(``tools/convert_checkpoint.py import`` writes the same format). Training can also upcycle at
start: ``checkpoint.upcycle_from=CKPT``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys

import torch

from trainer.config import Config, ConfigError, ModelConfig, config_to_dict, load_config
from trainer.distributed.layout import ParallelLayout

log = logging.getLogger("upclip")

TOWERS = (("visual", "vision"), ("text", "text"))
_ARCH_FIELDS = ("width", "layers", "heads", "mlp_ratio", "act", "ln_eps")


class UpcycleError(ValueError):
    pass


def dense_config(model: ModelConfig) -> ModelConfig:
    """The same architecture with every tower dense."""
    out = copy.deepcopy(model)
    out.vision.moe.num_experts = 0
    out.text.moe.num_experts = 0
    return out


def upcycle_state_dict(dense: dict[str, torch.Tensor], model: ModelConfig,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical dense state dict -> canonical MoE state dict (same on every rank)."""
    out = dict(dense)
    gen = torch.Generator().manual_seed(seed)
    for prefix, name in TOWERS:
        tower = getattr(model, name)
        moe = tower.moe
        for i in moe.moe_layers(tower.layers):
            mlp = f"{prefix}.transformer.layers.{i}.mlp."
            try:
                fc1_w, fc1_b = out.pop(mlp + "linear_fc1.weight"), out.pop(mlp + "linear_fc1.bias")
                fc2_w, fc2_b = out.pop(mlp + "linear_fc2.weight"), out.pop(mlp + "linear_fc2.bias")
            except KeyError as e:
                raise UpcycleError(f"dense state dict has no {e.args[0]} (is block {i} of the "
                                   f"{name} tower dense there?)") from None
            e = moe.num_experts
            copies = lambda t: t.unsqueeze(0).repeat(e, *([1] * t.dim())).contiguous()  # noqa: E731
            out[mlp + "deepspeed_moe.experts.w1"] = copies(fc1_w.t())   # [E, d, f]
            out[mlp + "deepspeed_moe.experts.b1"] = copies(fc1_b)       # [E, f]
            out[mlp + "deepspeed_moe.experts.w2"] = copies(fc2_w.t())   # [E, f, d]
            out[mlp + "deepspeed_moe.experts.b2"] = copies(fc2_b)       # [E, d]
            router = torch.zeros(e, tower.width, dtype=fc1_w.dtype)
            if moe.router_init == "normal":
                router.normal_(0.0, moe.router_init_std, generator=gen)
            out[mlp + "deepspeed_moe.gate.wg.weight"] = router
    return out


def check_same_architecture(saved: ModelConfig, wanted: ModelConfig, where: str) -> None:
    for _, name in TOWERS:
        for f in _ARCH_FIELDS + (("image_size", "patch_size") if name == "vision" else
                                 ("context_length", "vocab_size")):
            a, b = getattr(getattr(saved, name), f), getattr(getattr(wanted, name), f)
            if a != b:
                raise UpcycleError(f"{where}: model.{name}.{f}={a} but the config asks for {b}")
        if getattr(saved, name).moe.enabled:
            raise UpcycleError(f"{where}: model.{name} is already MoE; upcycle a dense "
                               f"checkpoint")
    if saved.embed_dim != wanted.embed_dim:
        raise UpcycleError(f"{where}: model.embed_dim={saved.embed_dim} but the config asks "
                           f"for {wanted.embed_dim}")


def upcycle_model(dense_ckpt: str, cfg: Config, layout: ParallelLayout) -> torch.nn.Module:
    """Collective. Builds the MoE model of ``cfg`` at ``layout`` from a dense checkpoint."""
    from trainer import checkpoint, step as S
    from trainer.config import config_from_saved
    from trainer.models.state import full_state_dict, load_full_state_dict

    manifest = checkpoint.read_manifest(dense_ckpt)
    saved = config_from_saved(manifest["config"]).model
    check_same_architecture(saved, cfg.model, str(checkpoint.resolve(dense_ckpt)))
    dense_cfg = copy.deepcopy(cfg)
    dense_cfg.model = dense_config(cfg.model)
    dense = S.build_model(dense_cfg, layout)
    checkpoint.load_model(dense_ckpt, dense, layout)
    full = full_state_dict(dense, layout)
    del dense
    moe_full = upcycle_state_dict(full, cfg.model, seed=cfg.train.seed)
    model = S.build_model(cfg, layout)
    load_full_state_dict(model, moe_full, layout)
    for prefix, name in TOWERS:
        tower = getattr(cfg.model, name)
        if tower.moe.enabled:
            log.info("upcycled %s blocks %s: %d experts, top-%d, %s dispatch", name,
                     tower.moe.moe_layers(tower.layers), tower.moe.num_experts, tower.moe.top_k,
                     tower.moe.dispatch)
    return model


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(prog="python -m trainer.moe.upcycle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="dense checkpoint (directory or root)")
    p.add_argument("--out", required=True, help="checkpoint root for the MoE model")
    p.add_argument("--config", help="YAML config with the moe settings")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_args(argv)
    from trainer import checkpoint
    from trainer.distributed import init_distributed, read_launch_env

    try:
        cfg = load_config(args.config, args.overrides)
        if not (cfg.model.vision.moe.enabled or cfg.model.text.moe.enabled):
            raise ConfigError("no tower has model.*.moe.num_experts > 0: nothing to upcycle")
        launch = read_launch_env()
        layout = ParallelLayout(launch.world_size, cfg.parallel.tp, cfg.parallel.pp,
                                cfg.parallel.ep)
        manifest = checkpoint.read_manifest(args.dense)
    except (ConfigError, checkpoint.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_distributed(launch)
    layout.initialize(seed=cfg.train.seed)
    try:
        model = upcycle_model(args.dense, cfg, layout)
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checkpoint.save_checkpoint(args.out, manifest["step"], model, config_to_dict(cfg), layout,
                               extra={"upcycled_from": str(checkpoint.resolve(args.dense))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
