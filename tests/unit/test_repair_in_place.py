"""In-place REPAIR of a population (PAPA-all / PAPA-2) on a real timm transformer.

timm's ConViT has bias-free attention projections (GPSA ``qk``/``v``, MHSA ``qkv``) that feed no BatchNorm:
in place, their mean cannot be shifted without adding a bias (another architecture), so REPAIR leaves them
alone and repairs every other layer. Before this rule, the first PAPA-all averaging of Table 1's ConViT-Ti
raised ``cannot repair a population in place``. Both code paths (member by member, and stacked through
vmap) are checked.
"""

import pytest
import torch

from papa.averaging import average_all_, mixing_matrix
from papa.population import Population
from papa.repair import member_moments, repair_population_

# 2 GPSA blocks and 1 MHSA block: both kinds of bias-free attention projection, at a small input
CONVIT = {"img_size": 32, "depth": 3, "local_up_to_layer": 2, "num_classes": 5}


def convit():
    import timm

    return timm.create_model("convit_tiny", **CONVIT)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    return lambda _member, _gen: iter(xs)


@pytest.mark.parametrize("stacked", [False, True], ids=["per-member", "stacked"])
def test_convit_population_averaged_and_repaired_in_place(data, stacked, one_thread):
    pop = Population.from_factory(convit, 3, seed=0)
    bias_free = {n for n, m in pop.template.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is None}
    assert {"blocks.0.attn.qk", "blocks.0.attn.v", "blocks.1.attn.qk", "blocks.2.attn.qkv"} <= bias_free
    moments = member_moments(pop, data, 2, stacked=stacked)
    average_all_(pop)
    averaged = {name: t.clone() for name, t in pop.params.items()}
    repair_population_(pop, mixing_matrix("all", 3), data, moments, 2, stacked=stacked)

    for name in bias_free:  # left alone: neither shifted nor rescaled
        assert pop.params.get(f"{name}.bias") is None
        assert torch.equal(pop.params[f"{name}.weight"], averaged[f"{name}.weight"]), name
    after = member_moments(pop, data, 2)
    repaired = [n for n in after[0] if n not in bias_free and n != "head"]
    assert {"blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.2.attn.proj", "blocks.2.mlp.fc2"} <= set(repaired)
    for name in repaired:  # every other layer has the members' average moments, in every member
        mean = torch.stack([m[name][0] for m in moments]).mean(0)
        std = torch.stack([m[name][1] for m in moments]).mean(0)
        for j in range(3):
            assert torch.allclose(after[j][name][0], mean, atol=1e-4, rtol=1e-3), (name, j)
            assert torch.allclose(after[j][name][1], std, atol=1e-4, rtol=1e-3), (name, j)
    assert not torch.equal(pop.params["blocks.0.mlp.fc1.weight"], averaged["blocks.0.mlp.fc1.weight"])
    assert torch.isfinite(pop.forward(0, torch.randn(2, 3, 32, 32))).all()
