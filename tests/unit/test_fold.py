"""Folding REPAIR's biases into BatchNorms (papa.fold): which layers feed a BatchNorm alone, exactness in eval and
train mode, and every bias kept where folding would change the outputs."""

import copy

import pytest
import torch
from torch import nn

from papa.fold import agrees, batchnorm_feeds, fold_biases
from papa.population import Population
from papa.repair import repair
from papa.soups import average_soup


def _bn(c: int, dims: int = 2) -> nn.Module:
    bn = nn.BatchNorm2d(c) if dims == 2 else nn.BatchNorm1d(c)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.normal_(bn.bias, 0.0, 0.3)
    bn.running_mean.normal_(0.0, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return bn


class Net(nn.Module):
    """conv1 -> bn1 (foldable); conv2 read by bn2 and by the residual (not); conv3 shared by two BatchNorms (foldable
    into both); bn4 fed by conv4 and conv5 (neither); fc1 -> BatchNorm1d (foldable); fc2 the output."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), _bn(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), _bn(4)
        self.conv3, self.bn3a, self.bn3b = nn.Conv2d(4, 4, 1, bias=False), _bn(4), _bn(4)
        self.conv4, self.conv5, self.bn4 = nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 4, 1, bias=False), _bn(4)
        self.fc1, self.bnf = nn.Linear(4, 6, bias=False), _bn(6, dims=1)
        self.fc2 = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = torch.relu(self.bn2(y) + y)
        x = torch.relu(self.bn3a(self.conv3(x))) + torch.relu(self.bn3b(self.conv3(x.flip(-1))))
        x = self.bn4(self.conv4(x)) + self.bn4(self.conv5(x))
        return self.fc2(torch.relu(self.bnf(self.fc1(x.mean((2, 3))))))


LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1"]


def _with_biases(net: nn.Module, layers=LAYERS, seed: int = 0) -> nn.Module:
    """``net`` with a random bias on each of ``layers``, as REPAIR leaves a soup."""
    net = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    for name in layers:
        layer = net.get_submodule(name)
        out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        layer.bias = nn.Parameter(torch.randn(out, generator=g))
    return net.eval()


@pytest.fixture
def x():
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_batchnorm_feeds_finds_the_batchnorms_that_alone_take_a_layers_output(x):
    torch.manual_seed(0)
    feeds = batchnorm_feeds(Net(), x)
    assert feeds == {"conv1": ["bn1"], "conv2": None, "conv3": ["bn3a", "bn3b"], "conv4": None, "conv5": None,
                     "fc1": ["bnf"], "fc2": None}


def test_folding_is_exact_in_eval_mode_and_keeps_what_cannot_fold(x):
    torch.manual_seed(0)
    soup = _with_biases(Net())
    folded, fold = fold_biases(soup, LAYERS, x)
    assert fold.folded == {"conv1": ["bn1"], "conv3": ["bn3a", "bn3b"], "fc1": ["bnf"]}
    assert fold.kept == ["conv2", "conv4", "conv5"]
    for name in fold.folded:
        assert folded.get_submodule(name).bias is None
    for name in fold.kept:
        assert torch.equal(folded.get_submodule(name).bias, soup.get_submodule(name).bias)
    # conv3's bias went into both of its BatchNorms
    b = soup.conv3.bias.detach()
    for bn in ("bn3a", "bn3b"):
        assert torch.allclose(folded.get_submodule(bn).running_mean, soup.get_submodule(bn).running_mean - b)
    z = torch.randn(8, 3, 5, 7, generator=torch.Generator().manual_seed(2))  # another input than the probe
    with torch.no_grad():
        torch.testing.assert_close(folded(z), soup(z), rtol=1e-5, atol=1e-5)
    assert soup.conv1.bias is not None  # the soup itself is unchanged


def test_folding_is_exact_in_train_mode_and_running_means_stay_consistent(x):
    """BatchNorm subtracts the batch mean in train mode: a folded bias changes neither the output nor, beyond the
    shift by b itself, the running mean a step updates."""
    torch.manual_seed(0)
    soup = _with_biases(Net(), ["conv1", "conv3", "fc1"])
    folded, fold = fold_biases(soup, ["conv1", "conv3", "fc1"], x)
    assert fold.kept == []
    soup.train(), folded.train()
    z = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(folded(z), soup(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.bn1.running_mean, soup.bn1.running_mean - soup.conv1.bias.detach())
    soup.eval(), folded.eval()
    with torch.no_grad():  # and the updated statistics still give the same network
        torch.testing.assert_close(folded(z), soup(z), rtol=1e-5, atol=1e-5)


class OddBN(nn.BatchNorm2d):
    """A BatchNorm that scales its input first: the hooks see a BatchNorm fed by the conv alone, but folding the
    bias into its running mean would be wrong."""

    def forward(self, x):
        return super().forward(2 * x)


def test_when_folding_would_change_the_outputs_every_bias_is_kept(x):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), OddBN(4), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False),
                        _bn(4), nn.Flatten(), nn.LazyLinear(2))
    net(x)
    net[1].running_mean.normal_()
    soup = _with_biases(net, ["0", "3"])
    assert batchnorm_feeds(soup, x)["0"] == ["1"]
    folded, fold = fold_biases(soup, ["0", "3"], x)
    assert fold.folded == {} and fold.kept == ["0", "3"] and "folding changed the outputs" in fold.note
    assert agrees(folded, soup, x) == (True, 0.0)


class Const(nn.Module):
    def __init__(self, *values: float):
        super().__init__()
        self.register_buffer("out", torch.tensor(values))

    def forward(self, x):
        return self.out


def test_outputs_agree_up_to_the_tolerance_times_the_largest_at_least_one(x):
    """Powers of two, so every bound is met exactly: 8 + 1/16 agrees with 8 at tol 1/128 (1/128 * 8), not at less;
    below 1 the bound is tol itself."""
    assert agrees(Const(8.0, 8.0625), Const(8.0, 8.0), x, tol=2**-7) == (True, 0.0625)
    assert agrees(Const(8.0, 8.0625), Const(8.0, 8.0), x, tol=2**-8)[0] is False
    assert agrees(Const(0.25 + 2**-7), Const(0.25), x, tol=2**-7)[0] is True
    assert agrees(Const(0.25 + 2**-6), Const(0.25), x, tol=2**-7)[0] is False
    assert agrees(Const(1.0, 2.0), Const(1.0), x) == (False, float("inf"))


def test_a_fold_that_only_float32_rounding_disturbs_is_made(x):
    """A bias of 1e7 against running mean 1e7 + 2: the unfolded network rounds 1e7 + y to whole numbers in float32,
    the folded one does not (its running mean is 2), so they disagree in float32, agree in float64, and the bias is
    folded."""
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).eval()
    with torch.no_grad():
        model[0].bias.fill_(1e7)
        model[1].running_mean.fill_(1e7 + 2)
        model[1].running_var.fill_(1e-2)
    assert agrees(copy.deepcopy(model), model, x)[0] is True
    stripped = copy.deepcopy(model)
    stripped[1].running_mean.fill_(2.0)
    stripped[0].bias = None
    assert agrees(stripped, model, x)[0] is False  # float32 rounding alone
    folded, fold = fold_biases(model, ["0"], x)
    assert fold.folded == {"0": ["1"]} and fold.kept == [] and folded[0].bias is None
    assert folded[1].running_mean.tolist() == [2.0, 2.0]


def test_a_repaired_soup_of_bias_free_convolutions_folds_into_the_stock_architecture():
    """The issue's case: REPAIR gives a two-conv network's soup conv biases the stock model lacks; folded, the soup
    loads into a freshly built network with strict=True and gives the soup's logits."""

    def make():
        return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), _bn(4), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False),
                             _bn(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))

    pop = Population.from_factory(make, 2, seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 1, 6, 6, generator=g) for _ in range(2)]
    soup = repair(average_soup(pop), pop, batches, iters=2).eval()
    stock = make()
    assert set(soup.state_dict()) - set(stock.state_dict()) == {"0.bias", "3.bias"}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        stock.load_state_dict(soup.state_dict())
    folded, fold = fold_biases(soup, ["0", "3"], batches[0])
    assert fold.folded == {"0": ["1"], "3": ["4"]}
    stock.load_state_dict(folded.state_dict(), strict=True)
    z = torch.randn(32, 1, 6, 6, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(z), soup(z), rtol=1e-5, atol=1e-6)
