"""The loop and stacked engines train a population identically.

Dropout: both engines draw masks from the global generator. vmap(randomness="different") draws one
(p, ...) mask per dropout layer per step, the loop one (...) mask per member, member after member. On
CPU a (p, ...) Bernoulli draw consumes the generator exactly like p consecutive (...) draws (checked in
``test_cpu_dropout_draws_are_sequential``), so with ONE dropout layer the two engines draw the same
masks and must agree to float tolerance with dropout active. (With several dropout layers the draw
order differs, so engines agree in distribution only; that case is covered by the per-member
independence test.)
"""

import contextlib
import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from papa import averaging
from papa.engines import (
    CPU_STACKED_MAX_GFLOP,
    ENGINES,
    Engine,
    _conv_weights_channels_last,
    choose_engine,
    forward_gflop,
    soft_cross_entropy,
    stacked_channels_last,
)
from papa.population import Population

P, B, CLASSES = 4, 8, 3
GENERAL = ("loop", "stacked")  # the engines that train any model (analytic: logistic regression only)


def bn_dropout_cnn() -> nn.Module:
    # no conv bias before BatchNorm: its gradient is zero up to rounding, which AdamW would amplify to
    # full-size steps in different directions for the two engines
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, CLASSES),
    )


def make_pop(same_init: bool = False) -> Population:
    pop = Population.from_factory(bn_dropout_cnn, P, seed=5, same_init=same_init).train()
    for t in pop.params.values():
        t.requires_grad_(True)
    return pop


def batches(steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(P, B, 1, 4, 4, generator=g)
        out.append((x, torch.softmax(torch.randn(P, B, CLASSES, generator=g), -1)))
    return out


def make_optimizer(kind: str, pop: Population) -> torch.optim.Optimizer:
    params = list(pop.params.values())
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    if kind == "sgd-momentum":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)


def average(variant: str, pop: Population, step: int) -> None:
    if variant == "papa":
        averaging.push_toward_average_(pop, 0.7)
    elif variant == "papa-all" and step % 2 == 1:
        averaging.average_all_(pop)
    elif variant == "papa-2" and step % 2 == 1:
        averaging.pair_average_(pop, torch.Generator().manual_seed(step))


def train(engine, variant: str = "baseline", optimizer: str = "sgd-momentum", steps: int = 4,
          dropout: bool = True, autocast=contextlib.nullcontext) -> tuple[Population, list]:
    pop = make_pop()
    if not dropout:
        pop.template[3].eval()  # dropout off, BatchNorm still in train mode
    opt = make_optimizer(optimizer, pop)
    torch.manual_seed(123)  # dropout masks
    losses = []
    for s, (x, t) in enumerate(batches(steps)):
        opt.zero_grad(set_to_none=False)
        losses.append(engine(pop, x, t, autocast))
        opt.step()
        average(variant, pop, s)
    return pop, losses


def assert_same(a: Population, b: Population, atol: float = 1e-5) -> None:
    for name, t in a.tensors():
        u = b.state_dict()[name]
        if t.is_floating_point():
            torch.testing.assert_close(t.detach(), u.detach(), atol=atol, rtol=1e-4, msg=name)
        else:
            assert torch.equal(t, u), name


# engines agree ------------------------------------------------------------------------------------
def test_cpu_dropout_draws_are_sequential():
    """The premise of the exact dropout comparison: one (p, ...) draw == p consecutive draws."""
    x = torch.ones(P, 50)
    torch.manual_seed(0)
    together = vmap(lambda v: F.dropout(v, 0.5, True), randomness="different")(x)
    torch.manual_seed(0)
    one_by_one = torch.stack([F.dropout(x[j], 0.5, True) for j in range(P)])
    assert torch.equal(together, one_by_one)


@pytest.mark.parametrize("variant", ["baseline", "papa", "papa-all", "papa-2"])
def test_engines_give_the_same_population(variant):
    """BatchNorm in train mode and dropout active; averaging of each variant between steps."""
    loop, loop_losses = train(ENGINES["loop"], variant)
    stacked, stacked_losses = train(ENGINES["stacked"], variant)
    assert_same(loop, stacked)
    torch.testing.assert_close(torch.stack(loop_losses), torch.stack(stacked_losses), atol=1e-5, rtol=1e-4)
    # BatchNorm statistics moved, and (unless just averaged) differ per member: the comparison is not vacuous
    var = stacked.buffers["1.running_var"]
    assert not torch.allclose(var, torch.ones_like(var))
    assert torch.allclose(var[0], var[1]) == (variant == "papa-all")
    assert stacked.buffers["1.num_batches_tracked"].tolist() == [4] * P


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum", "adamw"])
def test_engines_agree_for_each_optimizer(optimizer):
    loop, _ = train(ENGINES["loop"], "papa", optimizer)
    stacked, _ = train(ENGINES["stacked"], "papa", optimizer)
    assert_same(loop, stacked)


def test_loop_engine_matches_independent_modules():
    """The reference: member j trained by the loop engine (one stacked optimizer) equals a plain module
    trained alone with its own optimizer. Dropout is off so the two runs' masks cannot differ."""
    pop, _ = train(ENGINES["loop"], "baseline", "sgd-momentum", dropout=False)
    for j in range(P):
        module = make_pop().member(j).train()
        module[3].eval()
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
        for x, t in batches(4):
            opt.zero_grad()
            soft_cross_entropy(module(x[j]), t[j]).backward()
            opt.step()
        for name, value in module.state_dict().items():
            torch.testing.assert_close(pop.state_dict()[name][j], value, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("engine", ["loop", "stacked"])
def test_dropout_masks_are_independent_per_member(engine):
    """Identical members on identical data: with dropout only the masks tell them apart, so their
    losses differ; with dropout off they are identical. A reseeded run repeats itself exactly."""
    x, t = batches(1)[0]
    x, t = x[:1].expand_as(x).contiguous(), t[:1].expand_as(t).contiguous()

    def losses(dropout: bool, seed: int = 0):
        pop = make_pop(same_init=True)
        if not dropout:
            pop.template[3].eval()
        torch.manual_seed(seed)
        out = ENGINES[engine](pop, x, t, contextlib.nullcontext)
        return out, pop.params["6.weight"].grad.clone()

    on, grad_on = losses(True)
    off, grad_off = losses(False)
    assert torch.allclose(off, off[0].expand_as(off))
    assert torch.allclose(grad_off, grad_off[0].expand_as(grad_off))
    assert len(set(on.tolist())) == P
    assert not torch.allclose(grad_on[0], grad_on[1])
    again, grad_again = losses(True)
    assert torch.equal(on, again) and torch.equal(grad_on, grad_again)


def test_unused_parameters_get_no_gradient():
    """As in plain PyTorch, a parameter the loss does not use ends with .grad None (the optimizer skips
    it), whatever stale gradient it held."""
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, CLASSES), nn.Linear(4, CLASSES)

        def forward(self, x):
            return self.used(x.flatten(1))

    results = {}
    x, tg = torch.randn(2, 3, 1, 2, 2), torch.softmax(torch.randn(2, 3, CLASSES), -1)
    for name in GENERAL:
        pop = Population.from_factory(Partial, 2, seed=0)
        for t in pop.params.values():
            t.requires_grad_(True)
            t.grad = torch.full_like(t, 7.0)
        ENGINES[name](pop, x, tg, contextlib.nullcontext)
        assert pop.params["unused.weight"].grad is None, name
        results[name] = pop.params["used.weight"].grad
    torch.testing.assert_close(results["loop"], results["stacked"])


# options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["loop", "stacked"])
def test_channels_last_gives_the_same_population(name):
    plain, _ = train(Engine(name), "papa")
    cl, _ = train(Engine(name, channels_last=True), "papa")
    assert_same(plain, cl)


def test_stacked_channels_last_layout():
    x = torch.randn(P, B, 3, 5, 5)
    y = stacked_channels_last(x)
    assert torch.equal(x, y)
    # the grouped convolution's (B, p*C, H, W) view is channels-last without a copy
    view = y.movedim(0, 1).reshape(B, P * 3, 5, 5)
    assert view.data_ptr() == y.data_ptr() and view.is_contiguous(memory_format=torch.channels_last)


def test_conv_weights_are_copied_channels_last_and_the_rest_passed_as_they_are():
    bias, linear = torch.randn(6), torch.randn(6, 6)
    member = _conv_weights_channels_last({"w": torch.randn(6, 3, 3, 3), "b": bias, "fc": linear}, 4)
    assert member["w"].is_contiguous(memory_format=torch.channels_last) and member["b"] is bias
    assert member["fc"] is linear
    w = torch.randn(P, 6, 3, 3, 3)
    stacked = _conv_weights_channels_last({"w": w, "b": bias}, 5)
    grouped = stacked["w"].reshape(P * 6, 3, 3, 3)  # the grouped convolution's view, without a copy
    assert torch.equal(stacked["w"], w) and stacked["b"] is bias
    assert grouped.data_ptr() == stacked["w"].data_ptr() and grouped.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_on_cpu():
    """Smoke test of the mixed-precision path: finite fp32 gradients, both engines close."""

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    loop, loop_losses = train(ENGINES["loop"], "papa", steps=2, autocast=bf16)
    stacked, stacked_losses = train(ENGINES["stacked"], "papa", steps=2, autocast=bf16)
    for pop in (loop, stacked):
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in pop.params.values())
    torch.testing.assert_close(torch.stack(loop_losses), torch.stack(stacked_losses), atol=3e-2, rtol=3e-2)
    assert_same(loop, stacked, atol=3e-2)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("name", ["loop", "stacked"])
def test_compiled_engine_matches_eager_and_compiles_once(name):
    """torch.compile of the step on CPU (15-40 s here): same population as eager, and one compilation
    serves every member, step and averaging in between (no recompilation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled, _ = train(Engine(name, compile=True), "papa", dropout=False)
    eager, _ = train(Engine(name), "papa", dropout=False)
    assert_same(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_a_compiled_step_gives_each_batch_size_a_static_graph():
    """An epoch's short last batch (fidelity.last_batch) under torch.compile: the compiled step's losses are eager's
    at every batch size, each size is compiled once into a graph specialized to it (no symbolic batch size), and a
    full batch after a short one reuses its graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    engines = {Engine("stacked", compile=True): make_pop(), Engine("stacked"): make_pop()}  # same members
    for pop in engines.values():
        pop.template[3].eval()  # dropout off: the compiled graph draws its masks otherwise
    (x, t), = batches(1)
    for size in (B, B - 1, B - 2, B):
        torch.testing.assert_close(*(engine(pop, x[:, :size], t[:, :size], contextlib.nullcontext).detach()
                                     for engine, pop in engines.items()))
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])


def test_engine_reuses_its_compiled_function_per_template():
    engine = Engine("stacked", compile=False)
    a, b = make_pop(), make_pop()
    assert engine.loss_fn(a.template) is engine.loss_fn(a.template)
    assert engine.loss_fn(b.template) is not None and engine._template is b.template
    with pytest.raises(ValueError, match="unknown engine"):
        Engine("threads")


def test_choose_engine():
    """``auto``: the loop for one member, stacked on CUDA, and on a CPU stacked exactly for steps of at most
    CPU_STACKED_MAX_GFLOP forward GFLOP per member (the loop when the work is not given)."""
    assert choose_engine("loop", torch.device("cuda")) == "loop"
    assert choose_engine("stacked", torch.device("cpu")) == "stacked"
    assert choose_engine("auto", torch.device("cuda")) == "stacked"
    assert choose_engine("auto", "cuda:0", population=10, member_gflop=100.0) == "stacked"
    assert choose_engine("auto", "cuda", population=1) == "loop"
    assert choose_engine("auto", "cpu", population=1, member_gflop=0.0) == "loop"
    limit = CPU_STACKED_MAX_GFLOP
    assert choose_engine("auto", torch.device("cpu"), population=4) == "loop"
    assert choose_engine("auto", "cpu", population=10, member_gflop=limit) == "stacked"
    assert choose_engine("auto", "cpu", population=2, member_gflop=1e-6) == "stacked"
    assert choose_engine("auto", "cpu", population=10, member_gflop=limit * 1.01) == "loop"
    for device, p in (("cpu", 10), ("cpu", 1), ("cuda", 10)):  # logistic regression in fp32, wherever it runs
        assert choose_engine("auto", device, population=p, member_gflop=0.0, analytic=True) == "analytic"
    assert choose_engine("stacked", "cpu", population=10, analytic=True) == "stacked"


def test_forward_flops_are_the_layers_multiply_adds_and_change_nothing():
    """forward_gflop counts two FLOPs per multiply-add of every convolution (grouped, transposed) and linear
    layer, as torch's FLOP counter does for these models, and leaves the tensors and the mode as they were."""
    from torch.utils.flop_counter import FlopCounterMode

    from papa.models import create_model

    logreg = Population.from_factory(lambda: create_model("logreg", 10, in_channels=1), 2)
    assert forward_gflop(logreg.template, logreg.member_tensors(0), (1, 8, 8)) * 1e9 == 2 * 64 * 10
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ConvTranspose2d(8, 2, 2, stride=2), nn.Flatten(),
                            nn.Linear(2 * 12 * 12, 5))
    for model, shape in ((grouped, (4, 8, 8)), (create_model("digits_cnn", 10, in_channels=1), (1, 8, 8)),
                         (create_model("resnet18_cifar", 10), (3, 32, 32))):
        pop = Population.from_factory(lambda m=model: copy.deepcopy(m), 2).train()
        before = {n: t.clone() for n, t in pop.tensors()}
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
        assert forward_gflop(pop.template, pop.member_tensors(1), shape) * 1e9 == counter.get_total_flops()
        assert pop.template.training and all(torch.equal(t, before[n]) for n, t in pop.tensors())


def test_build_engine_resolves_auto_from_the_config():
    """The trainer's engine is a function of the config: A.10's logistic regression is analytic (stacked in bf16
    or compiled), the digits CNN at batch 1 (overhead-bound) is stacked on a CPU, a ResNet-18 at batch 8 loops
    there, an explicit engine is kept; the analytic engine asked for what it cannot train is one line."""
    from papa.build import build_engine
    from papa.data import load_dataset
    from papa.errors import PapaError
    from papa.models import create_model
    from tests.helpers import tiny_experiment

    digits = load_dataset("digits")
    cases = (("logreg", 1, {}, "analytic"), ("logreg", 1, {"precision": "bf16"}, "stacked"),
             ("logreg", 4, {"compile": True}, "stacked"), ("digits_cnn", 1, {}, "stacked"),
             ("resnet18_cifar", 8, {}, "loop"))
    for model, batch, options, expected in cases:
        exp = tiny_experiment(model={"name": model, "kwargs": {}}, population={"size": 10},
                              train={"engine": "auto", "batch_size": batch, **options})
        pop = Population.from_factory(lambda m=model: create_model(m, 10, in_channels=1), 10)
        assert build_engine(exp, torch.device("cpu"), pop, digits).name == expected, (model, options)
        exp["train"]["engine"] = "loop" if expected != "loop" else "stacked"
        assert build_engine(exp, torch.device("cpu"), pop, digits).name == exp["train"]["engine"]
        exp["train"]["engine"] = "analytic"
        if expected == "analytic":
            assert build_engine(exp, torch.device("cpu"), pop, digits).name == "analytic"
        else:
            with pytest.raises(PapaError, match="analytic trains logistic regression"):
                build_engine(exp, torch.device("cpu"), pop, digits)


def logreg_population(p: int = P) -> Population:
    from papa.models import create_model

    pop = Population.from_factory(lambda: create_model("logreg", CLASSES, in_channels=1, image_size=4), p, seed=2)
    for t in pop.params.values():
        t.requires_grad_(True)
    return pop


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum", "adamw"])
def test_analytic_engine_is_the_stacked_engine_bit_for_bit(batch, optimizer):
    """Logistic regression's closed-form step gives exactly the stacked engine's losses, gradients and so
    parameters, step after step, for one-hot and soft targets (label smoothing, mixup) and raw 0-16 pixels."""
    g = torch.Generator().manual_seed(batch)
    data = []
    for k in range(6):
        x = torch.randint(0, 17, (P, batch, 1, 4, 4), generator=g).float()
        y = torch.randint(0, CLASSES, (P, batch), generator=g)
        soft = torch.softmax(3 * torch.randn(P, batch, CLASSES, generator=g), -1)
        data.append((x, soft if k % 2 else F.one_hot(y, CLASSES).float()))
    runs = {}
    for name in ("stacked", "analytic"):
        pop = logreg_population()
        opt = make_optimizer(optimizer, pop)
        losses, grads = [], []
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            losses.append(ENGINES[name](pop, x, y, contextlib.nullcontext))
            grads.append({n: t.grad.clone() for n, t in pop.params.items()})
            opt.step()
        runs[name] = pop.params, losses, grads
    (p_s, l_s, g_s), (p_a, l_a, g_a) = runs["stacked"], runs["analytic"]
    assert all(torch.equal(a, b) for a, b in zip(l_s, l_a, strict=True))
    assert all(torch.equal(a[n], b[n]) for a, b in zip(g_s, g_a, strict=True) for n in a)
    assert all(torch.equal(p_s[n], p_a[n]) for n in p_s)
    assert not torch.equal(p_a["linear.weight"], logreg_population().params["linear.weight"])  # it trained


def test_analytic_engine_skips_frozen_parameters_and_refuses_other_models():
    """A parameter that does not train gets no gradient (as in the autograd engines); any model but logistic
    regression is refused rather than trained with the wrong gradient."""
    pop = logreg_population()
    pop.params["linear.bias"].requires_grad_(False)
    x, y = torch.randn(P, 2, 1, 4, 4), torch.softmax(torch.randn(P, 2, CLASSES), -1)
    ENGINES["analytic"](pop, x, y, contextlib.nullcontext)
    assert pop.params["linear.bias"].grad is None and pop.params["linear.weight"].grad is not None
    with pytest.raises(ValueError, match="logistic regression only"):
        ENGINES["analytic"](make_pop(), *batches(1)[0], contextlib.nullcontext)


class TiedNet(nn.Module):
    """Two linear layers sharing one weight (as a language model ties its embedding and output layer)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_tied_weights_stay_tied_in_the_engines_and_untied_models_skip_the_search():
    from papa.engines import has_tied_tensors, member_loss_fn

    assert has_tied_tensors(TiedNet()) and not has_tied_tensors(bn_dropout_cnn())
    pop = Population.from_factory(TiedNet, 2, seed=1)
    assert "b.weight" not in pop.params  # one stacked tensor for the shared weight
    x, t = torch.randn(5, 3), torch.softmax(torch.randn(5, 3), -1)
    for j in range(2):
        member = TiedNet()
        member.load_state_dict({**pop.member_tensors(j), "b.weight": pop.params["a.weight"][j]})
        expected = soft_cross_entropy(member(x), t)
        got = member_loss_fn(pop.template)({n: v[j] for n, v in pop.params.items()}, {}, x, t)
        torch.testing.assert_close(got, expected)


def test_engine_autocast_is_applied():
    seen = []

    @contextlib.contextmanager
    def autocast():
        seen.append(True)
        yield

    pop = make_pop()
    x, t = batches(1)[0]
    for name in GENERAL:
        seen.clear()
        ENGINES[name](copy.deepcopy(pop), x, t, autocast)
        assert seen


@pytest.mark.parametrize("name, size", [("timm/convit_tiny", 224), ("timm/eva02_tiny_patch14_224", 224),
                                        ("timm/test_resnet", 32)])
def test_engines_agree_on_the_fine_tuning_architectures(name, size, one_thread):
    """engine: auto trains the fine-tuning configs' timm models (gated-attention ViT, EVA-02 with rotary
    embeddings and fused attention, ResNet) with the stacked engine on CUDA: vmap must give the loop's
    losses and gradients for them too."""
    from papa.models import create_model

    grads = {}
    for engine in ("loop", "stacked"):
        pop = Population.from_factory(lambda: create_model(name, num_classes=CLASSES), 2, seed=0).train()
        for t in pop.params.values():
            t.requires_grad_(t.is_floating_point())
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 2, 3, size, size, generator=g)
        targets = torch.softmax(torch.randn(2, 2, CLASSES, generator=g), -1)
        torch.manual_seed(0)
        losses = ENGINES[engine](pop, x, targets, contextlib.nullcontext)
        grads[engine] = (losses, {n: t.grad for n, t in pop.params.items() if t.grad is not None})
    (loop_losses, loop_grads), (stacked_losses, stacked_grads) = grads["loop"], grads["stacked"]
    torch.testing.assert_close(stacked_losses, loop_losses, atol=1e-5, rtol=1e-4)
    assert stacked_grads.keys() == loop_grads.keys() and loop_grads
    for n, g in loop_grads.items():
        torch.testing.assert_close(stacked_grads[n], g, atol=1e-4, rtol=1e-3, msg=n)


def test_trainer_runs_logistic_regression_analytic_with_the_stacked_engines_result(tmp_path):
    """``engine: auto`` trains A.10's model with the analytic engine, and a PAPA-all run (averaging and all)
    ends exactly where the same run on the stacked engine does: the choice changes the speed, not a number."""
    from papa import runs
    from papa.data import load_split
    from papa.train import Trainer
    from tests.helpers import tiny_experiment

    split = tmp_path / "split.json"
    runs.prepare(tiny_experiment(), split)
    result = {}
    for engine in ("auto", "stacked"):
        exp = tiny_experiment(model={"name": "logreg"}, population={"size": 3},
                              train={"engine": engine, "epochs": 2, "batch_size": 2},
                              averaging={"papa-all": {"every": 1, "repair": False}})
        exp["model"]["kwargs"] = {}
        trainer = Trainer(exp, "papa-all", 4, runs.load_data(exp), load_split(split), progress=False)
        trainer.fit()
        result[trainer.engine_name] = trainer.pop.params
    assert result.keys() == {"analytic", "stacked"}
    assert all(torch.equal(result["analytic"][n], result["stacked"][n]) for n in result["stacked"])
