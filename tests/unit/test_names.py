"""The naming contract (trainer/moe/names.py) against the model as built: every name it
spells exists in the canonical state dict, and every parameter's kind tag is what the
learning-rate groups expect."""
import fnmatch

from trainer.config import load_config
from trainer.models.build import build_for_training
from trainer.models.state import canonical_names
from trainer.moe import names

MOE = ["model.vision.moe.num_experts=4", "model.vision.moe.every=2",
       "model.text.moe.num_experts=2", "model.text.moe.every=2", "model.text.vocab_size=1000"]


def test_contract_names_exist_in_the_built_model(dist1):
    cfg = load_config(None, MOE)
    model = build_for_training(cfg, dist1)
    canon = canonical_names(model)
    have = set(canon.values())
    prefixes = names.moe_mlp_prefixes(cfg.model)
    assert {p.split(".")[0] for p in prefixes} == {"visual", "text"}
    for mlp in prefixes:
        assert names.router_key(mlp) in have
        for t in names.EXPERT_TENSORS:
            assert names.expert_key(mlp, t) in have
        for t in names.DENSE_FFN:
            assert mlp + t not in have            # an MoE block has no dense MLP
    dense_mlps = {n.rsplit("linear_fc1.", 1)[0] for n in have if ".mlp.linear_fc1." in n}
    assert dense_mlps and not dense_mlps & set(prefixes)
    for mlp in dense_mlps:
        assert all(mlp + t in have for t in names.DENSE_FFN)
    # kinds are tags on the parameters, and agree with the names
    for n, p in model.named_parameters():
        kind = names.kind_of(p)
        if kind == "router":
            assert canon[n].endswith(names.ROUTER)
        elif kind == "expert":
            assert names.EXPERTS in canon[n] and not getattr(p, "allreduce", True)
        else:
            assert names.DISPATCH not in canon[n]
    # the trainable sets select exactly the names they promise
    for entry, kind in (("experts", "expert"), ("router", "router")):
        picked = {canon[n] for n, p in model.named_parameters()
                  if any(fnmatch.fnmatchcase(canon[n], g) for g in names.TRAINABLE_SETS[entry])}
        tagged = {canon[n] for n, p in model.named_parameters() if names.kind_of(p) == kind}
        assert picked == tagged
