"""DMU's parts (trainer/dmu/, trainer/data/grouping.py, train.trainable) on CPU, one process.

Every expectation is computed in the test, not by the code under test. Tolerances:
- k-means: float64 inputs; labels identical to a plain-python Lloyd loop from the same seeds,
  centers within 1e-12 (measured 0 to 1e-16: the same sums in another order); chunked and
  unchunked distance passes give identical labels;
- label-grouped batches and their resume: exact (sample keys and pixel sums);
- FFN-only training: every frozen parameter bit-identical after 3 AdamW steps (weight decay
  0.1), every trainable one changed;
- the assembled MoE with every unit forced to expert e against stage e's dense model: image and
  text embeddings within 1e-6 abs (measured 0: the same float32 operations), for top-1 and top-2,
  capacity and dropless dispatch; experts pairwise apart (relative distance > 1e-3).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

import peers
from data_resume import stop_and_resume

TINY = str(Path(__file__).resolve().parents[2] / "configs/dmu_tiny.yaml")

# --------------------------------------------------------------------------- k-means


def _blobs(n_per=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 4 * torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 5.0, -2.0]],
                             dtype=torch.float64)
    x = torch.cat([m + 0.5 * torch.randn(n_per, 3, generator=g, dtype=torch.float64)
                   for m in means])
    truth = torch.arange(3).repeat_interleave(n_per)
    perm = torch.randperm(len(x), generator=g)
    return x[perm], truth[perm]


def _python_lloyd(points, centers, iters):
    """Textbook Lloyd on python floats: nearest center (lowest index on ties), mean update,
    empty clusters keep their center; stops when no label changes."""
    labels = None
    for _ in range(iters):
        new = []
        for p in points:
            d = [sum((a - b) ** 2 for a, b in zip(p, c)) for c in centers]
            new.append(min(range(len(centers)), key=lambda j: (d[j], j)))
        if new == labels:
            break
        labels = new
        for j in range(len(centers)):
            members = [p for p, lab in zip(points, labels) if lab == j]
            if members:
                centers[j] = [sum(col) / len(members) for col in zip(*members)]
    return labels, centers


def test_kmeans_matches_python_reference():
    from trainer.dmu.kmeans import kmeans, kmeans_pp, lloyd

    x, truth = _blobs()
    for seed in (0, 1, 7):
        init = kmeans_pp(x, 3, torch.Generator().manual_seed(seed))
        got, centers, _ = lloyd(x, init, iters=50)
        ref_labels, ref_centers = _python_lloyd(x.tolist(), init.tolist(), 50)
        assert got.tolist() == ref_labels
        ref = torch.tensor(ref_centers, dtype=torch.float64)
        assert float((centers - ref).abs().max()) <= 1e-12
        # well separated blobs: the partition is the truth up to a renumbering
        pairs = set(zip(got.tolist(), truth.tolist()))
        assert len(pairs) == 3
        a, b = kmeans(x, 3, seed=seed), kmeans(x, 3, seed=seed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])          # deterministic
        c = kmeans(x, 3, seed=seed, chunk=7)                                 # chunked distances
        assert torch.equal(a[0], c[0])
    inits = {tuple(kmeans_pp(x, 3, torch.Generator().manual_seed(s)).flatten().tolist())
             for s in range(5)}
    assert len(inits) > 1                                                    # the seed matters
    with pytest.raises(ValueError, match="N >= k"):
        kmeans(x[:2], 3)


def test_cluster_table_accumulates_and_ignores_order():
    from trainer.dmu.config import DMUConfig
    from trainer.dmu.labels import cluster_table

    x, truth = _blobs(n_per=10, seed=3)
    keys = [f"k{i:03d}" for i in range(len(x))]
    text = torch.zeros(len(x), 2, dtype=torch.float64)
    text[:, 0] = torch.arange(len(x)) % 2 * 10.0      # two obvious text clusters: parity
    prev = {k: int(i % 5 == 0) for i, k in enumerate(keys)}
    dmu = DMUConfig(clusters=3, cluster_on="image")
    t1 = cluster_table(keys, x, text, prev, dmu, seed=0)
    # groups = distinct (previous group, image cluster) pairs, numbered in sorted order
    by_pair = {}
    for i, k in enumerate(keys):
        by_pair.setdefault((prev[k], int(truth[i])), set()).add(t1["labels"][k])
    assert all(len(v) == 1 for v in by_pair.values())              # a pair is one group
    assert len({next(iter(v)) for v in by_pair.values()}) == len(by_pair) == t1["num_groups"]
    assert sum(t1["group_sizes"]) == len(keys)
    groups_of_prev = {}
    for k in keys:
        groups_of_prev.setdefault(t1["labels"][k], set()).add(prev[k])
    assert all(len(v) == 1 for v in groups_of_prev.values())       # groups refine the old ones
    numbered = {prev_g: {next(iter(v)) for (pg, _), v in by_pair.items() if pg == prev_g}
                for prev_g in (0, 1)}
    assert max(numbered[0]) < min(numbered[1])                     # numbered by previous group
    # the same samples in another order (another data-parallel layout): the same table
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(1)).tolist()
    t2 = cluster_table([keys[i] for i in perm], x[perm], text[perm], prev, dmu, seed=0)
    assert t2["labels"] == t1["labels"]
    # both modalities: label = text * clusters + image, before joining the previous groups
    both = cluster_table(keys, x, text, None, DMUConfig(clusters=2, cluster_on="both"), seed=0)
    assert both["num_groups"] <= 4 and sum(both["group_sizes"]) == len(keys)
    parity = {}
    for i, k in enumerate(keys):
        parity.setdefault(both["labels"][k], set()).add(i % 2)
    assert all(len(v) == 1 for v in parity.values())               # text clusters split parity


# --------------------------------------------------------------------------- grouped batches

N_SAMPLES, SHARD = 48, 6


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from trainer.data.sources import synthetic_scenes
    from trainer.data.writer import write_shards

    d = tmp_path_factory.mktemp("grouped")
    sink = write_shards(synthetic_scenes(N_SAMPLES, seed=2, size=32), d, "s", SHARD)
    keys = [f"scene0002_{i:08d}" for i in range(N_SAMPLES)]
    table = {k: zlib.crc32(k.encode()) % 3 for k in keys}    # 3 groups, fixed by key
    (d / "labels.json").write_text(json.dumps({"labels": table}))
    return sink.pattern(), d / "labels.json", table


def _data_cfg(pattern, labels, **kw):
    from trainer.data.config import DataConfig

    cfg = DataConfig(train_urls=pattern, batch_size=4, workers=0, image_size=16,
                     shuffle_buffer=5, seed=3, group_labels=str(labels))
    cfg.tokenizer.context_length = 8
    cfg.augment.scale_min = 0.5
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _fp(batch):
    return tuple(batch["keys"]), round(float(batch["images"].double().sum()), 6)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("drop_last", [True, False])
def test_grouped_batches_hold_one_group(scenes, workers, drop_last):
    from trainer.data.pipeline import build_train_loader

    pattern, labels, table = scenes
    loader = build_train_loader(_data_cfg(pattern, labels, workers=workers, drop_last=drop_last,
                                          shuffle_shards=False), rank=0, world=1)
    batches = [b["keys"] for b in loader]
    assert all(len({table[k] for k in keys}) == 1 for keys in batches)
    seen = [k for keys in batches for k in keys]
    assert len(seen) == len(set(seen))
    if drop_last:  # per worker (shard i -> worker i mod W): every full group batch
        assert all(len(keys) == 4 for keys in batches)
        w = max(1, workers)
        per_worker = [[i for i in range(N_SAMPLES) if (i // SHARD) % w == j] for j in range(w)]
        expected = sum(sum(1 for i in ws if table[f"scene0002_{i:08d}"] == g) // 4
                       for ws in per_worker for g in range(3))
        assert len(batches) == expected
    else:
        assert sorted(seen) == sorted(table)
    # a table missing from disk is one clear error naming the field
    with pytest.raises(ValueError, match="data.group_labels"):
        build_train_loader(_data_cfg(pattern, labels.parent / "none.json"), rank=0, world=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_grouped_resume_is_exact(scenes, workers):
    from trainer.data.pipeline import build_train_loader

    pattern, labels, _ = scenes
    cfg = _data_cfg(pattern, labels, workers=workers)
    ref = [_fp(b) for b in build_train_loader(cfg, 0, 1)]
    assert len(ref) >= 5
    for stop in (1, 3):
        got, state, _ = stop_and_resume(lambda: build_train_loader(cfg, 0, 1), stop, _fp)
        assert any(c["pending"] for c in state["cursors"])  # samples wait in partial groups
        assert got == ref, (stop, got, ref)


# --------------------------------------------------------------------------- train.trainable

def _cfg(*overrides):
    from trainer.config import load_config
    return load_config(None, [f"model.text.vocab_size={peers.VOCAB}", *overrides])


def test_ffn_only_training_leaves_the_rest_bit_identical(dist1):
    from trainer import optim as O, step as S
    from trainer.distributed import grads as G
    from trainer.models import build as B
    from trainer.dmu.assemble import ffn_patterns
    from trainer.models.state import canonical_names
    from trainer.data.batches import synthetic_microbatches

    moe = _cfg("model.vision.moe.num_experts=2", "model.vision.moe.every=2",
               "model.text.moe.num_experts=2", "model.text.moe.layers=[0]").model
    patterns = ffn_patterns(moe)   # FFNs of vision block 1 and text block 0
    cfg = _cfg(f"train.trainable={json.dumps(patterns)}", "train.weight_decay=0.1",
               "train.lr=0.01", "train.micro_batch_size=4")
    torch.manual_seed(0)
    model = B.build_for_training(cfg, dist1)
    names = canonical_names(model)
    trainable = {names[n] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {p for p in patterns}, trainable
    before = {names[n]: p.detach().clone() for n, p in model.named_parameters()}
    ddp = G.wrap_ddp(model)
    opt = O.build_optimizer(model, cfg.train)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(patterns)
    for step in range(1, 4):
        O.set_lr(opt, cfg.train.lr)
        S.forward_backward(ddp, synthetic_microbatches(cfg, dist1, step), cfg)
        G.finalize_grads(ddp, dist1)
        G.clip_grads(ddp, dist1, cfg.train.grad_clip)
        opt.step()
        O.clamp_logit_scale(model, cfg.train.max_logit_scale)
        G.zero_grads(ddp, opt)
    for n, p in model.named_parameters():
        name = names[n]
        if name in trainable:
            assert not torch.equal(p.detach(), before[name]), name
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_trainable_errors_name_the_field(dist1):
    from trainer import optim as O
    from trainer.models import build as B
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.trainable\[1\]='fnn'"):
        _cfg("train.trainable=[ffn, fnn]")
    with pytest.raises(ConfigError, match=r"train.trainable=\['router'\]: router needs a tower"):
        _cfg("train.trainable=[router]")     # a dense model has no router
    dense = _cfg("train.trainable=[visual.nothing.*]")
    with pytest.raises(ValueError, match=r"train.trainable=\['visual.nothing.\*'\] selects no"):
        O.build_optimizer(B.build_for_training(dense, dist1), dense.train)
    model = B.build_for_training(_cfg("train.trainable=[ffn]"), dist1)
    assert {n.split(".mlp.")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        f"{t}.transformer.layers.{i}" for t in ("visual", "text") for i in (0, 1)}


# --------------------------------------------------------------------------- assembly

def _features(model, images, text):
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)


@pytest.mark.parametrize("top_k,dispatch", [(1, "capacity"), (2, "capacity"), (2, "dropless")])
def test_assembled_expert_equals_its_stage_model(dist1, top_k, dispatch):
    from trainer.models import build as B
    from trainer.dmu.assemble import (DMUError, assemble_state_dict, expert_distances,
                                      ffn_patterns, stage_ffn)
    from trainer.models.state import full_state_dict, load_full_state_dict
    from trainer.moe.layer import force_expert
    from trainer.moe.upcycle import dense_config

    moe_args = [f"model.{t}.moe.{k}={v}" for t in ("vision", "text") for k, v in (
        ("num_experts", 3), ("every", 2), ("top_k", top_k), ("dispatch", dispatch))]
    cfg = _cfg(*moe_args, "model.vision.moe.routing=image")
    dense_cfg = _cfg()
    dense_cfg.model = dense_config(cfg.model)
    torch.manual_seed(3)
    dense = B.build_for_training(dense_cfg, dist1)
    dense_full = full_state_dict(dense, dist1)
    ffn = set(ffn_patterns(cfg.model))
    stages, stage_models = [], []
    for k in (1, 2):  # a stage: the dense model with its MoE-block FFNs moved (as MCL does)
        g = torch.Generator().manual_seed(k)
        full = {n: (t + 0.05 * torch.randn(t.shape, generator=g) if n in ffn else t.clone())
                for n, t in dense_full.items()}
        model = B.build_for_training(dense_cfg, dist1)
        load_full_state_dict(model, full, dist1)
        stage_models.append(model)
        stages.append(stage_ffn(full, dense_full, cfg.model, k))
    state = assemble_state_dict(dense_full, stages, cfg.model, seed=0)
    moe = B.build_for_training(cfg, dist1)
    load_full_state_dict(moe, state, dist1)
    images, text = peers.sample_inputs(n=5, seed=4)
    for e, ref in enumerate([dense] + stage_models):
        ri, rt = _features(ref, images, text)
        with force_expert(moe, e):
            gi, gt = _features(moe, images, text)
        di, dt = float((gi - ri).abs().max()), float((gt - rt).abs().max())
        assert di <= 1e-6 and dt <= 1e-6, (e, di, dt)
    dist = expert_distances(state, cfg.model)
    assert all(dist[a][b] > 1e-3 for a in range(3) for b in range(3) if a != b), dist
    assert all(dist[a][a] == 0.0 for a in range(3))
    gi, _ = _features(moe, images, text)          # free routing runs and differs from expert 0
    assert float((gi - _features(dense, images, text)[0]).abs().max()) > 1e-6
    # a stage that changed anything but those FFNs cannot be assembled
    bad = dict(dense_full, **{"visual.ln_pre.weight": dense_full["visual.ln_pre.weight"] + 1})
    with pytest.raises(DMUError, match="visual.ln_pre.weight"):
        stage_ffn(bad, dense_full, cfg.model, 3)
    with pytest.raises(ValueError, match="outside"):
        with force_expert(moe, 3):
            pass


def test_dmu_plan_errors_name_the_field(tmp_path):
    from trainer.config import ConfigError, load_config
    from trainer.dmu.run import make_plan

    with pytest.raises(ConfigError, match="dmu.dense is empty"):
        make_plan(load_config(TINY, ["dmu.dense="]))
    with pytest.raises(ConfigError, match="dmu.dense='nowhere'"):
        make_plan(load_config(TINY, ["dmu.dense=nowhere"]))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("step_1\n")
    base = ["dmu.dense=" + str(ckpt)]
    with pytest.raises(ConfigError, match="num_experts=3, model.text.moe.num_experts=4"):
        make_plan(load_config(TINY, base + ["model.text.moe.num_experts=4"]))
    with pytest.raises(ConfigError, match=r"dmu.stage: unknown config key 'train.stpes'"):
        make_plan(load_config(TINY, base + ['dmu.stage=["train.stpes=3"]']))
    with pytest.raises(ConfigError, match="dmu.router may not change model"):
        make_plan(load_config(TINY, base + ['dmu.router=["model.embed_dim=8"]']))
    with pytest.raises(ConfigError, match="dmu.cluster_on='img'"):
        load_config(TINY, ["dmu.cluster_on=img"])
    plan = make_plan(load_config(TINY, base + ["run_dir=" + str(tmp_path)]))
    assert len(plan.stages) == 2
    s = plan.stages[1]
    assert s.model.vision.moe.num_experts == 0 and not s.train.global_contrastive
    assert s.data.group_labels == str(tmp_path / "stage_2" / "labels.json")
    assert s.train.trainable == [f"{t}.transformer.layers.1.mlp.{w}" for t in ("visual", "text")
                                 for w in ("linear_fc1.weight", "linear_fc1.bias",
                                           "linear_fc2.weight", "linear_fc2.bias")]
    assert plan.router.train.trainable == ["router"] and plan.router.model.vision.moe.enabled
