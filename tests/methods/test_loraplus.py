"""LoRA+ (lightning_peft.methods.loraplus): the parameter groups, and splitting the groups of an existing optimizer."""

import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from lightning_peft import apply_loraplus, loraplus_param_groups
from lightning_peft.core import mark_trainable, set_adapter_trainable
from lightning_peft.methods.lora import inject_lora
from lightning_peft.methods.loraplus import RATIO_KEY

B = ["q.lora_b.default", "v.lora_b.default"]
VECTORS = ["norm.weight", "norm.bias", "head.bias"]
REST = ["q.lora_a.default", "v.lora_a.default", "head.weight"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.v, self.norm, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.norm(self.v(torch.relu(self.q(x)))))


def _lora_model(**lora) -> Tiny:
    """LoRA on q and v; LayerNorm and head trained in full (``trainable_modules``); the rest frozen."""
    model = Tiny()
    inject_lora(model, ["q", "v"], r=2, **lora)
    mark_trainable(model, extra=[f"{m}.{p}" for m in ("norm", "head") for p in ("weight", "bias")])
    return model


def _names(model, params) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in params]


def _two_groups(model, lr=1e-2, **kw):
    """The usual optimizer: matrices decayed, 1-D parameters not (as lightning_peft.tasks builds it); settings of its
    own in the first group (none of them AdamW's or this optimizer's defaults)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": 0.05, "betas": (0.7, 0.9), "eps": 1e-6},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=lr, betas=(0.8, 0.95), **kw,
    )


# -- loraplus_param_groups ---------------------------------------------------------------------------------------------
def test_groups_put_b_and_vectors_at_ratio_times_lr():
    model = _lora_model()
    groups = loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    assert [_names(model, g["params"]) for g in groups] == [REST, B, VECTORS]
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(16e-3), pytest.approx(16e-3)]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0]
    assert [g.get(RATIO_KEY) for g in groups] == [None, 16.0, 16.0]
    assert not any(n.startswith(("q.weight", "v.weight")) for g in groups for n in _names(model, g["params"]))  # frozen: left out
    torch.optim.AdamW(groups)  # an optimizer takes them as they are


def test_groups_match_peft_create_loraplus_optimizer():
    """Oracle: Hugging Face PEFT's grouping on the same model (LoRA on q/v; LayerNorm and head as modules_to_save)."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    theirs_model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["q", "v"], modules_to_save=["norm", "head"]))
    theirs = create_loraplus_optimizer(theirs_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1)

    def canonical(name: str) -> str:
        name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        return name.replace("lora_A.default.weight", "lora_a.default").replace("lora_B.default.weight", "lora_b.default")

    def table(model, groups):
        return {canonical(n): (round(g["lr"], 12), g["weight_decay"]) for g in groups for n in _names(model, g["params"])}

    model = _lora_model()
    ours = table(model, loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1))
    assert ours == table(theirs_model, theirs.param_groups)
    assert sorted(ours) == sorted(B + VECTORS + REST)


def test_b_is_found_through_the_lora_layers_not_by_name():
    model = _lora_model()
    model.extra = nn.Module()
    model.extra.lora_b = nn.Parameter(torch.zeros(2, 2))  # named like a B matrix, but no LoRA layer holds it
    rest, b, _ = loraplus_param_groups(model, lr=1.0, loraplus_lr_ratio=4)
    assert _names(model, rest["params"]) == REST + ["extra.lora_b"] and _names(model, b["params"]) == B


def test_a_frozen_named_adapter_and_dora_magnitudes():
    model = _lora_model(use_dora=True)
    inject_lora(model, ["q", "v"], r=2, adapter_name="other")
    set_adapter_trainable(model, "other", False, extra=["head.weight", "head.bias"])
    _, b, vectors = loraplus_param_groups(model, lr=1.0, loraplus_lr_ratio=4, weight_decay=0.1)
    assert _names(model, b["params"]) == B  # "other" is frozen: in no group
    # PEFT's rule puts every vector with B; unlike PEFT (which decays vectors outside biases and LayerNorms) no weight decay
    assert _names(model, vectors["params"]) == ["q.lora_magnitude.default", "v.lora_magnitude.default", "head.bias"]
    assert vectors["lr"] == 4.0 and vectors["weight_decay"] == 0.0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])  # no frozen B in it: none is missing
    assert apply_loraplus(opt, model, 4) == [1]
    assert _names(model, opt.param_groups[1]["params"]) == ["q.lora_b.default", "q.lora_magnitude.default", "v.lora_b.default", "v.lora_magnitude.default", "head.bias"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(loraplus_lr_ratio=True), TypeError, r"loraplus_param_groups: loraplus_lr_ratio must be a number, got True \(bool\)\. .*e\.g\. 16"),
        (dict(loraplus_lr_ratio="16"), TypeError, r"loraplus_lr_ratio must be a number, got '16' \(str\)"),
        (dict(loraplus_lr_ratio=math.inf), ValueError, r"loraplus_lr_ratio must be a finite number > 0, got inf\. LoRA\+ multiplies B's learning rate"),
        (dict(loraplus_lr_ratio=math.nan), ValueError, r"loraplus_lr_ratio must be a finite number > 0, got nan"),
        (dict(loraplus_lr_ratio=0), ValueError, r"loraplus_lr_ratio must be a finite number > 0, got 0\."),
        (dict(loraplus_lr_ratio=-2.0), ValueError, r"loraplus_lr_ratio must be a finite number > 0, got -2\.0"),
        (dict(lr=0.0), ValueError, r"lr must be a finite number > 0, got 0\.0\. Pass the learning rate of A"),
        (dict(lr=False), TypeError, r"lr must be a number, got False \(bool\)"),
        (dict(weight_decay=-0.1), ValueError, r"weight_decay must be a finite number >= 0, got -0\.1"),
        (dict(weight_decay=math.inf), ValueError, r"weight_decay must be a finite number >= 0, got inf"),
    ],
)
def test_arguments_are_checked_strictly(kwargs, error, match):
    args = dict(lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.0) | kwargs
    with pytest.raises(error, match=match):
        loraplus_param_groups(_lora_model(), **args)


def test_a_model_without_lora_is_refused():
    model = Tiny()
    with pytest.raises(ValueError, match=r"Tiny has no trainable LoRA B matrix .* LoRA\+ would change nothing\. Inject LoRA first"):
        loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=16)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got list"):
        loraplus_param_groups([model], lr=1e-3, loraplus_lr_ratio=16)


# -- apply_loraplus ----------------------------------------------------------------------------------------------------
def test_apply_splits_the_groups_and_keeps_their_settings():
    model = _lora_model()
    opt = _two_groups(model)
    assert apply_loraplus(opt, model, 16) == [1, 2]
    g = opt.param_groups
    assert [_names(model, x["params"]) for x in g] == [REST, VECTORS, B]  # the vectors' group held only vectors: scaled in place
    assert [x["lr"] for x in g] == [1e-2, pytest.approx(0.16), pytest.approx(0.16)]
    assert [x["weight_decay"] for x in g] == [0.05, 0.0, 0.05]  # B keeps the settings of the group it came from
    assert [x["betas"] for x in g] == [(0.7, 0.9), (0.8, 0.95), (0.7, 0.9)] and [x["eps"] for x in g] == [1e-6, 1e-8, 1e-6]
    assert [x.get(RATIO_KEY) for x in g] == [None, 16.0, 16.0]


def _train(model, opt, steps=3, sched=None):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_apply_trains_exactly_as_the_groups_of_loraplus_param_groups():
    a, b = _lora_model(), _lora_model()
    with torch.no_grad():  # B != 0, so that A gets gradients from the first step
        for m in (a, b):
            m.q.lora_b["default"].fill_(0.1), m.v.lora_b["default"].fill_(0.1)
    opt_a = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    apply_loraplus(opt_a, a, 8)
    after_a = _train(a, opt_a)
    after_b = _train(b, torch.optim.AdamW(loraplus_param_groups(b, lr=1e-2, loraplus_lr_ratio=8)))
    for n, v in after_a.items():
        torch.testing.assert_close(v, after_b[n], rtol=0, atol=0)
    plain = _lora_model()
    with torch.no_grad():
        plain.q.lora_b["default"].fill_(0.1), plain.v.lora_b["default"].fill_(0.1)
    after_plain = _train(plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0))
    assert not torch.equal(after_plain["q.lora_b.default"], after_a["q.lora_b.default"])  # the ratio does change training


def _schedulers():
    return {
        "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
        "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda s: 0.9),
        "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4),
        "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=5),
        "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
        "SequentialLR": lambda o: lr_scheduler.SequentialLR(
            o, [lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(o, gamma=0.8)], milestones=[2]
        ),
        "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler([lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(o, gamma=0.9)]),
        "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0, min_lr=1e-4),
    }


@pytest.mark.parametrize("kind", sorted(_schedulers()))
def test_schedulers_keep_the_ratio_through_steps(kind):
    model = _lora_model()
    opt = _two_groups(model)
    sched = _schedulers()[kind](opt)
    apply_loraplus(opt, model, 16, schedulers=[sched])
    assert sched.get_last_lr() == pytest.approx([g["lr"] for g in opt.param_groups])
    seen = []
    for step in range(8):
        _train(model, opt, steps=1)
        sched.step(1.0 + step) if kind == "ReduceLROnPlateau" else sched.step()  # a metric that never improves
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[1] == pytest.approx(16 * lrs[0]) and lrs[2] == pytest.approx(16 * lrs[0]), (step, lrs)
        assert sched.get_last_lr() == pytest.approx(lrs)
        seen.append(lrs[0])
    assert len(set(seen)) > 1  # the schedule did change the learning rate


@pytest.mark.parametrize(
    "make",
    [
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
        lambda o: lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1),
    ],
    ids=["OneCycleLR", "CyclicLR"],
)
def test_schedulers_that_cannot_follow_are_refused_before_anything_changes(make):
    model = _lora_model()
    opt = _two_groups(model)
    sched = make(opt)
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(TypeError, match=rf"cannot give the learning-rate scheduler {type(sched).__name__} .* Supported: LambdaLR, .*ReduceLROnPlateau, SequentialLR"):
        apply_loraplus(opt, model, 16, schedulers=[sched])
    assert opt.param_groups == before


def test_a_scheduler_that_is_not_passed_is_refused():
    model = _lora_model()
    opt = _two_groups(model)
    lr_scheduler.LinearLR(opt)
    with pytest.raises(ValueError, match=r"groups have 'initial_lr', so a learning-rate scheduler was created on it: pass it"):
        apply_loraplus(opt, model, 16)
    other = _two_groups(_lora_model())
    with pytest.raises(ValueError, match=r"the scheduler LinearLR drives another optimizer"):
        apply_loraplus(opt, model, 16, schedulers=[lr_scheduler.LinearLR(other)])


def test_b_missing_from_the_optimizer_is_refused():
    model = _lora_model()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("v.")])
    with pytest.raises(ValueError, match=r"1 trainable LoRA B matrices are not in the optimizer \(e\.g\. \['v\.lora_b\.default'\]\)"):
        apply_loraplus(opt, model, 16)


def test_a_second_call_splits_nothing_and_another_ratio_is_refused():
    model = _lora_model()
    opt = _two_groups(model)
    assert apply_loraplus(opt, model, 16) == [1, 2]
    lrs = [g["lr"] for g in opt.param_groups]
    assert apply_loraplus(opt, model, 16.0) == [1, 2]
    assert [g["lr"] for g in opt.param_groups] == lrs
    with pytest.raises(ValueError, match=r"already has LoRA\+ groups with loraplus_lr_ratio=16\.0 .* and 4\.0 was asked for"):
        apply_loraplus(opt, model, 4)
    # groups built by loraplus_param_groups are LoRA+ groups already
    built = torch.optim.AdamW(loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=16))
    assert apply_loraplus(built, model, 16) == [1, 2] and len(built.param_groups) == 3
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio=16\.0"):
        apply_loraplus(built, model, 2)


def test_param_names_split_with_their_parameters():
    model = _lora_model()
    opt = torch.optim.SGD([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=0.1)
    apply_loraplus(opt, model, 2)
    for g in opt.param_groups:
        assert g["param_names"] == _names(model, g["params"])
    assert opt.param_groups[1]["param_names"] == ["q.lora_b.default", "v.lora_b.default", "norm.weight", "norm.bias", "head.bias"]


def test_apply_checks_its_arguments():
    model = _lora_model()
    with pytest.raises(ValueError, match=r"apply_loraplus: loraplus_lr_ratio must be a finite number > 0, got inf"):
        apply_loraplus(_two_groups(model), model, math.inf)
    with pytest.raises(TypeError, match=r"apply_loraplus: optimizer must be a torch\.optim\.Optimizer, got list"):
        apply_loraplus([], model, 16)
