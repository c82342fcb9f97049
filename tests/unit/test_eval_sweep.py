"""The compute dial (trainer/eval/sweep.py) and the inference FLOPs counter it prints
(trainer/metrics.py ``inference_flops_per_sample``), in one process on trainer/hub.py's plain
model (the megatron model: tests/distributed/test_eval_dist.py runs tools/evaluate.py
--checkpoint --sweep).

- the counter equals a formula written out here for the tiny CLIP (exact: integer arithmetic
  in floats far below 2^53), token and image routing, both capacity rules;
- each sweep row's FLOPs equal the counter of a config built with that setting from the
  command line (exact), the model really routes at the setting (the capacity each MoE layer
  used equals ``capacity_for`` of the setting) and is restored afterwards;
- bad ``--sweep`` arguments give one line naming the argument.
"""
import pytest
import torch

import peers

B = 4        # pairs routed together
VS, TS = 17, 16          # tiny: vision tokens (4x4 patches + class), text context length
D, F, EMB = 64, 256, 32


def cfg_of(*overrides):
    from trainer.config import load_config
    return load_config(None, [f"model.text.vocab_size={peers.VOCAB}", *overrides])


def moe_over(tower, **kw):
    return [f"model.{tower}.moe.{k}={v}" for k, v in kw.items()]


def attention(s):
    return 2 * s * 4 * D * D + 2 * 2 * s * s * D


def dense_tower(s):
    """2 dense blocks + the projection of the pooled token."""
    return 2 * (attention(s) + 2 * 2 * D * F * s) + 2 * D * EMB


PATCH_EMBED = 2 * 16 * 3 * 8 * 8 * D


@pytest.mark.parametrize("routing,rule,k,cf,expert_tokens", [
    # token routing: U = 4 images x 17 = 68 units, E = 4
    ("token", "deepspeed", 2, 1.0, 136),   # C = ceil(68/4*2) = 34; 4*34 = 136 = k*U
    ("token", "deepspeed", 2, 0.5, 68),    # C = ceil(17) = 17; 4*17 = 68
    ("token", "deepspeed", 1, 4.0, 68),    # C = 68; 4*68 > k*U = 68: every route, 68
    ("token", "axlearn", 2, 1.0, 80),      # C = floor(17) -> 20; 4*20 = 80
    ("token", "axlearn", 1, 0.25, 16),     # C = floor(4.25) = 4 <= min 4 -> 4; 4*4 = 16
    # image routing: U = 4 images of 17 tokens
    ("image", "deepspeed", 2, 1.0, 8 * 17),  # C = ceil(4/4*2) = 2 images -> 8 = k*U images
    ("image", "axlearn", 1, 1.0, 4 * 17),    # C = floor(1) = 1 <= min 4 -> 4; 16 > k*U = 4
])
def test_counter_equals_hand_formula(routing, rule, k, cf, expert_tokens):
    from trainer.metrics import inference_flops_per_sample

    cfg = cfg_of(*moe_over("vision", num_experts=4, last=1, top_k=k, routing=routing,
                           capacity_rule=rule, eval_capacity_factor=cf, min_capacity=4))
    got = inference_flops_per_sample(cfg.model, B)
    units = B if routing == "image" else B * VS
    moe_block = attention(VS) + 2 * D * 4 * units / B + 2 * 2 * D * F * expert_tokens / B
    vision = attention(VS) + 2 * 2 * D * F * VS + moe_block + 2 * D * EMB + PATCH_EMBED
    assert got == {"vision": vision, "text": dense_tower(TS), "total": vision + dense_tower(TS)}


def test_counter_dropless_and_dense():
    from trainer.metrics import inference_flops_per_sample

    dense = inference_flops_per_sample(cfg_of().model, B)
    assert dense["vision"] == dense_tower(VS) + PATCH_EMBED and dense["text"] == dense_tower(TS)
    cfg = cfg_of(*moe_over("text", num_experts=4, every=1, top_k=2, dispatch="dropless",
                           eval_capacity_factor=0.1))
    text = 2 * (attention(TS) + 2 * D * 4 * TS + 2 * 2 * D * F * 2 * TS) + 2 * D * EMB
    assert inference_flops_per_sample(cfg.model, B)["text"] == text   # k * U, no capacity


def _plain_model(model_cfg, seed=0):
    from trainer.hub import UpCLIPModel

    torch.manual_seed(seed)
    model = UpCLIPModel(model_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def test_sweep_rows_equal_counter_and_route_at_setting(capsys):
    from trainer.eval.sweep import format_table, parse_sweep, run_sweep
    from trainer.hub import MoEMLP
    from trainer.metrics import inference_flops_per_sample
    from trainer.moe.routing import capacity_for

    trained = dict(num_experts=4, every=1, top_k=2, eval_capacity_factor=2.0, min_capacity=1,
                   capacity_rule="axlearn")
    over = moe_over("vision", **trained) + moe_over("text", **trained)
    model = _plain_model(cfg_of(*over).model)
    mlps = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert len(mlps) == 4
    seen = []
    for m in mlps:
        route = m.route
        m.route = lambda x, valid, route=route: seen.append(route(x, valid)) or seen[-1]
    images, text = peers.sample_inputs(n=B, seed=3)

    def evaluate():
        seen.clear()
        with torch.no_grad():
            out = model(images, text)
        return {"caps": [r.capacity for r in seen], "k": [r.experts.shape[1] for r in seen],
                "score": float((out["image_features"] * out["text_features"]).sum())}

    settings = parse_sweep(["capacity_factor=0.5,1,4", "top_k=1,2"])
    assert len(settings) == 6
    rows = run_sweep(model, cfg_of(*over).model, settings, B, evaluate, log=print)
    flops = {}
    for row in rows:
        k, cf = row["top_k"], row["capacity_factor"]
        direct = cfg_of(*over, *(f"model.{t}.moe.{a}={v}" for t in ("vision", "text")
                                 for a, v in (("top_k", k), ("eval_capacity_factor", cf))))
        assert row["flops"] == inference_flops_per_sample(direct.model, B), (k, cf)
        flops[k, cf] = row["flops"]["total"]
        want_caps = [capacity_for(u, 4, cf, k, 1, "axlearn")
                     for u in (B * VS, B * VS, B * TS, B * TS)]
        assert row["metrics"]["caps"] == want_caps and row["metrics"]["k"] == [k] * 4
    # axlearn capacity has no * k: at CF 0.5 the buffers bind at top-1 and top-2 alike; at
    # top-1 CF 1 already holds every route (k * U), so CF 4 adds nothing; the rest all differ
    assert flops[1, 0.5] == flops[2, 0.5] and flops[1, 1.0] == flops[1, 4.0]
    assert len(set(flops.values())) == 4
    assert len({r["metrics"]["score"] for r in rows}) == 6   # and the embeddings
    assert all(m.moe.top_k == 2 and m.moe.eval_capacity_factor == 2.0 for m in mlps)  # undone
    table = format_table(rows, columns=("score",))
    for row in rows:
        assert f"{row['flops']['total'] / 1e9:.6g}" in table
    assert table.splitlines()[0].split() == ["top_k", "capacity_factor", "GFLOPs_vision",
                                             "GFLOPs_text", "GFLOPs_total", "score"]
    assert "GFLOPs/pair" in capsys.readouterr().out


@pytest.mark.parametrize("items,message", [
    (["capacity=1"], "--sweep 'capacity=1': expected KEY=V1,V2,... with KEY one of"),
    (["top_k=1,x"], "--sweep 'top_k=1,x': not a list of integers"),
    (["top_k=3"], "--sweep top_k=3: [3] out of range"),
    (["capacity_factor=0,1"], "--sweep capacity_factor=0,1: [0.0] out of range"),
    (["top_k=1", "top_k=2"], "--sweep: top_k given twice"),
])
def test_bad_sweep_arguments(items, message):
    from trainer.eval.sweep import SweepError, parse_sweep

    with pytest.raises(SweepError) as e:
        parse_sweep(items)
    assert str(e.value).startswith(message), str(e.value)


def test_sweep_checks_against_the_model():
    from trainer.eval.sweep import SweepError, check_sweep, parse_sweep

    cfg = cfg_of(*moe_over("vision", num_experts=1, every=1, top_k=1))
    with pytest.raises(SweepError, match="top_k=2: the vision tower has 1 experts"):
        check_sweep(cfg, parse_sweep(["top_k=1,2"]))
    cfg = cfg_of(*moe_over("vision", num_experts=4, every=1), "parallel.tp=2")
    with pytest.raises(SweepError, match=r"parallel\.tp=1 \(got parallel\.tp=2\)"):
        check_sweep(cfg, parse_sweep(["top_k=1"]))


def test_evaluate_cli_bad_sweep_exit_2(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(root / "tools/evaluate.py"), "--checkpoint",
                           str(tmp_path), "--sweep", "top_k=1", "capacity_factor=1,x"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: --sweep 'capacity_factor=1,x': not a list of numbers\n"
