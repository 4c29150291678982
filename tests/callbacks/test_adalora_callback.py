import csv
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_peft.callbacks.adalora import AdaLoRA, rank_grid
from lightning_peft.callbacks.lora import LoRA
from lightning_peft.methods.adalora import AdaLoRALinear, orthogonal_regularization
from tests.callbacks.helpers import TinyLM, full_loss
from tests.conftest import tiny_llama


def trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_steps", 12)
    return L.Trainer(
        accelerator="cpu", devices=1, logger=kw.pop("logger", False), enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, enable_checkpointing=kw.pop("enable_checkpointing", False),
        num_sanity_val_steps=0, limit_val_batches=kw.pop("limit_val_batches", 0), **kw,
    )


def expected_budgets(init, target, tinit, tfinal, total, delta_t, steps):
    """The budget after each optimizer step, written from the paper's schedule (peft's formula), independently of the code."""
    current, out = init, []
    for t in range(steps):
        if t < total - tfinal:
            if t > tinit and t % delta_t == 0:
                current = int((init - target) * (1 - (t - tinit) / (total - tfinal - tinit)) ** 3 + target)
        else:
            current = target
        out.append(current)
    return out


class Probe(Callback):
    """Records, after AdaLoRA's hooks, the gradients it leaves, the budget and the masks after each optimizer step."""

    def __init__(self, ada):
        self.ada, self.budgets, self.grads, self.masks = ada, [], [], []
        self.stepped = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: m.adalora_a.grad.clone() for n, m in self.ada.layers.items()})
        self.stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stepped:
            self.stepped = False
            self.budgets.append(self.ada.allocator.budget())
            self.masks.append({n: m.rank_mask.clone() for n, m in self.ada.layers.items()})
            for m in self.ada.layers.values():  # masked triplets are zero after every step
                assert torch.count_nonzero(m.adalora_e[~m.rank_mask]) == 0


def test_fit_allocates_prunes_logs_and_draws(tmp_path):
    L.seed_everything(0)
    module = TinyLM()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    loss0 = full_loss(module)
    ada = AdaLoRA(init_r=6, target_r=3, tinit=2, tfinal=4, delta_t=1, alpha=12, target_modules="all-linear")
    probe = Probe(ada)
    logger = CSVLogger(tmp_path, name="logs")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer(tmp_path, [ada, probe, ckpt], max_steps=16, logger=logger, log_every_n_steps=1, enable_checkpointing=True).fit(module)
    assert len(ada.injected) == 14
    assert full_loss(module) < loss0 - 0.2
    after = module.state_dict()
    for k, v in base.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)  # base untouched
    # the schedule, step by step, and the final physically pruned ranks
    assert probe.budgets == expected_budgets(84, 42, 2, 4, 16, 1, 16)
    assert sum(ada.final_ranks.values()) == 42 and len(set(ada.final_ranks.values())) > 1  # moved between layers
    for name, r in ada.final_ranks.items():
        layer = module.get_submodule(name)
        assert layer.adalora_a.shape == (r, layer.in_features) and layer.adalora_b.shape == (layer.out_features, r)
        assert sum(ada.rank_pattern[name]) == r and len(ada.rank_pattern[name]) == 6
    # logged to the Trainer's logger, written beside the checkpoints
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    budget_col = [float(r["adalora/budget"]) for r in rows if r.get("adalora/budget")]
    assert budget_col[-1] == 42 and budget_col[0] == 84
    assert any(k.startswith("adalora/rank/1.self_attn.q_proj") for k in rows[0])
    assert (tmp_path / "ckpt" / "adalora_ranks.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "ckpt" / "adalora_ranks.json").read_text())
    assert saved["ranks"] == ada.final_ranks


def test_schedule_fractions_resolve_to_steps(tmp_path):
    """tinit/tfinal given as fractions of the run are the same schedule as the equivalent step counts."""
    L.seed_everything(0)
    ada = AdaLoRA(init_r=6, target_r=3, tinit=0.125, tfinal=0.25, delta_t=1, target_modules="all-linear", heatmap=False)
    probe = Probe(ada)
    trainer(tmp_path, [ada, probe], max_steps=16).fit(TinyLM())
    assert (ada.allocator.tinit, ada.allocator.tfinal) == (2, 4)
    assert probe.budgets == expected_budgets(84, 42, 2, 4, 16, 1, 16)
    with pytest.raises(ValueError, match=r"tinit=1 \+ tfinal=11 >= 12 optimizer steps"):
        trainer(tmp_path, [AdaLoRA(init_r=4, target_r=2, tinit=0.1, tfinal=0.95, target_modules=["q_proj"])], max_steps=12).fit(TinyLM())


def test_parameter_budget_caps_the_adapter_at_uniform_rank_parameters(tmp_path):
    """budget="params": the pruned adapter holds at most the parameters of rank target_r in every layer."""
    L.seed_everything(0)
    module = TinyLM()
    ada = AdaLoRA(init_r=6, target_r=3, tinit=2, tfinal=4, delta_t=1, alpha=12, target_modules="all-linear", budget="params")
    probe = Probe(ada)
    trainer(tmp_path, [ada, probe], max_steps=16).fit(module)
    layers = {n: module.get_submodule(n) for n in ada.final_ranks}
    cost = {n: m.in_features + m.out_features + 1 for n, m in layers.items()}
    target = 3 * sum(cost.values())
    stored = sum(m.adalora_a.numel() + m.adalora_e.numel() + m.adalora_b.numel() for m in layers.values())
    assert stored == sum(r * cost[n] for n, r in ada.final_ranks.items()) <= target
    assert stored > target - max(cost.values())  # the budget is used up to less than one triplet
    assert probe.budgets[0] == 6 * sum(cost.values()) and probe.budgets[-1] == stored
    assert all(b1 >= b2 for b1, b2 in zip(probe.budgets, probe.budgets[1:]))


class PeftMirror(Callback):
    """Runs after AdaLoRA's hooks: at every optimizer step it hands peft's AdaLoraModel.update_and_allocate the weights
    and gradients AdaLoRA's allocator just read (orthogonal regularizer included), then compares the EMAs, and after the
    step (once AdaLoRA applied its masks) the allocated triplets and the zeroed E entries."""

    def __init__(self, ada, theirs):
        self.ada, self.theirs, self.problems, self.patterns, self.scale = ada, theirs, [], [], 0.0
        self.stepped = False

    def _pairs(self, name, layer):
        peft_layer = self.theirs.base_model.model.get_submodule(name[len("model."):])  # TinyLM.model is peft's model
        return ((layer.adalora_a, peft_layer.lora_A["default"]), (layer.adalora_e, peft_layer.lora_E["default"]), (layer.adalora_b, peft_layer.lora_B["default"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step, alloc, ref = trainer.global_step, self.ada.allocator, self.theirs.base_model.rankallocator
        with torch.no_grad():
            for n, m in self.ada.layers.items():
                for src, dst in self._pairs(n, m):
                    dst.copy_(src)
                    dst.grad = src.grad.clone()
        self.theirs.base_model.update_and_allocate(step)
        if bool(alloc.ema_ipt) != bool(ref.exp_avg_ipt):
            self.problems.append(f"step {step}: EMAs kept {bool(alloc.ema_ipt)}, peft {bool(ref.exp_avg_ipt)}")
        for n in alloc.ema_ipt if ref.exp_avg_ipt else []:
            for key, pname in (("a", "lora_A"), ("e", "lora_E"), ("b", "lora_B")):
                for ours, theirs, what in ((alloc.ema_ipt, ref.exp_avg_ipt, "S"), (alloc.ema_unc, ref.exp_avg_unc, "U")):
                    expected = theirs[f"{n[len('model.'):]}.{pname}.default"]  # tiny numbers: tolerance on their own scale
                    if not torch.allclose(ours[n][key], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())):
                        self.problems.append(f"step {step}: {what}_{key} of {n} differs from peft")
                    self.scale = max(self.scale, float(expected.abs().max()))
        self.stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.stepped:
            return
        self.stepped = False
        step, rank_pattern = trainer.global_step - 1, self.theirs.peft_config["default"].rank_pattern
        pattern = {n: rank_pattern[f"{n[len('model.'):]}.lora_E.default"] if rank_pattern else [True] * self.ada.init_r for n in self.ada.layers}
        self.patterns.append(pattern)
        for n, m in self.ada.layers.items():
            if m.rank_pattern() != pattern[n]:
                self.problems.append(f"step {step}: {n} keeps {m.rank_pattern()}, peft {pattern[n]}")
            if torch.count_nonzero(m.adalora_e[~torch.tensor(pattern[n])]):
                self.problems.append(f"step {step}: {n} has non-zero E in triplets peft masks")


@pytest.mark.parametrize(("beta1", "beta2"), [(0.85, 0.95), (0.95, 0.85)])
def test_allocation_equals_peft_at_every_step_through_the_trainer(tmp_path, beta1, beta2):
    """The callback in a real fit, against peft fed the same weights and gradients at every optimizer step: unequal
    betas (both ways), tinit a multiple of delta_t, the final allocation (total - tfinal = 11) off the delta_t grid;
    same EMAs, same triplets allocated after every step, masked E zero after every step, final allocation fixed."""
    peft = pytest.importorskip("peft")
    total, tinit, tfinal, delta_t = 14, 4, 3, 2
    targets = ["q_proj", "v_proj", "down_proj"]
    cfg = peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, target_modules=targets, total_step=total, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
        beta1=beta1, beta2=beta2, orth_reg_weight=0.5,
    )
    theirs = peft.get_peft_model(tiny_llama(), cfg).train()
    L.seed_everything(0)
    module = TinyLM(n=16, batch_size=4)
    ada = AdaLoRA(
        init_r=4, target_r=2, tinit=tinit, tfinal=tfinal, delta_t=delta_t, beta1=beta1, beta2=beta2, alpha=8,
        target_modules=targets, heatmap=False,
    )
    mirror = PeftMirror(ada, theirs)
    trainer(tmp_path, [ada, mirror], max_steps=total).fit(module)
    assert (ada.allocator.beta1, ada.allocator.beta2) == (beta1, beta2)
    assert len(mirror.patterns) == total and mirror.problems == [] and mirror.scale > 0
    final = total - tfinal
    assert all(p == mirror.patterns[final] for p in mirror.patterns[final:])  # fixed after the final allocation
    assert mirror.patterns[tinit] == {n: [True] * 4 for n in ada.layers} != mirror.patterns[tinit + delta_t]  # first cut after tinit
    assert ada.rank_pattern == mirror.patterns[-1] and sum(ada.final_ranks.values()) == 2 * len(targets) * 2


def test_rank_grid_layers_by_module_types():
    rows, cols, grid = rank_grid({"m.layers.0.attn.q": 3, "m.layers.0.mlp.up": 5, "m.layers.10.attn.q": 1, "m.layers.2.attn.q": 2, "pooler.dense": 4})
    assert rows == ["0", "2", "10", "-"] and cols == ["attn.q", "mlp.up", "pooler.dense"]
    assert grid == [[3, 5, None], [2, None, None], [1, None, None], [None, None, 4]]


def _run_allocation(tmp_path, batch_size, accumulate, steps=6):
    L.seed_everything(0)
    module = TinyLM(batch_size=batch_size, n=4 * steps, lr=1e-2)
    ada = AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=1, target_modules=["q_proj", "v_proj", "down_proj"], total_steps=steps)
    probe = Probe(ada)
    trainer(tmp_path, [ada, probe], max_steps=steps, accumulate_grad_batches=accumulate).fit(module)
    return ada, probe


def test_gradient_accumulation_gives_the_same_allocation(tmp_path):
    """1 batch of 4 vs 4 micro-batches of 1 (accumulate_grad_batches=4): same gradients, scores and masks."""
    one, p1 = _run_allocation(tmp_path, batch_size=4, accumulate=1)
    four, p4 = _run_allocation(tmp_path, batch_size=1, accumulate=4)
    assert len(p1.masks) == len(p4.masks) == 6  # once per optimizer step, not per micro-batch
    for g1, g4 in zip(p1.grads, p4.grads):
        for n in g1:
            torch.testing.assert_close(g1[n], g4[n], rtol=1e-4, atol=1e-6)
    for m1, m4 in zip(p1.masks, p4.masks):
        assert all(torch.equal(m1[n], m4[n]) for n in m1)
    assert one.final_ranks == four.final_ranks
    assert len(set(one.final_ranks.values())) > 1


class BareTensorLM(TinyLM):
    """training_step returns a bare loss tensor computed by hand (no HF output with a .loss)."""

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self.model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class DictLM(TinyLM):
    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx), "extra": 1}


@pytest.mark.parametrize("module_cls", [BareTensorLM, DictLM])
def test_orthogonal_regularization_reaches_the_gradients(tmp_path, module_cls):
    def first_grads(weight):
        L.seed_everything(0)
        module = module_cls()
        ada = AdaLoRA(init_r=4, target_r=2, tinit=0, tfinal=0, orth_reg_weight=weight, target_modules=["q_proj", "v_proj"], total_steps=10)
        probe = Probe(ada)
        trainer(tmp_path, [ada, probe], max_steps=1).fit(module)
        return probe.grads[0], module

    with_reg, _ = first_grads(0.5)
    without, _ = first_grads(0.0)
    # the difference is exactly 0.5 * dR/dA at the initial weights
    L.seed_everything(0)
    fresh = module_cls()
    AdaLoRA(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"]).inject(fresh)
    layers = {n: m for n, m in fresh.named_modules() if isinstance(m, AdaLoRALinear)}
    reg_grads = torch.autograd.grad(0.5 * orthogonal_regularization(list(layers.values())), [m.adalora_a for m in layers.values()])
    for (name, m), g in zip(layers.items(), reg_grads):
        assert g.abs().max() > 1e-3
        torch.testing.assert_close(with_reg[name] - without[name], g, rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_runs_and_allocates(tmp_path):
    L.seed_everything(0)
    module = TinyLM()
    ada = AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=2, target_modules=["q_proj", "v_proj"])
    probe = Probe(ada)
    trainer(tmp_path, [ada, probe], max_steps=8, precision="bf16-mixed").fit(module)
    assert probe.budgets[-1] == 8 and sum(ada.final_ranks.values()) == 8


def test_fp16_gradients_reach_the_allocator_unscaled(tmp_path):
    """With a GradScaler the allocator sees the same importance whatever the loss scale (unscale_ runs first)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def importance(scale):
        L.seed_everything(0)
        module = TinyLM()
        ada = AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=2, orth_reg_weight=0.5, target_modules=["q_proj", "v_proj"], total_steps=10)
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
        trainer(tmp_path, [ada], max_steps=1, plugins=[plugin]).fit(module)
        return ada.allocator.ema_ipt

    small, large = importance(2.0**2), importance(2.0**14)
    for n in small:
        torch.testing.assert_close(small[n]["a"], large[n]["a"], rtol=2e-2, atol=1e-7)
        assert small[n]["a"].abs().max() > 0


class LateRestore(L.pytorch.strategies.SingleDeviceStrategy):
    """Restores the checkpoint (callbacks included) after ``on_fit_start``, as FSDP, ModelParallel and DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self):
        return True


@pytest.mark.parametrize("late_restore", [False, True], ids=["restored-before-fit-start", "restored-after-fit-start"])
def test_resume_continues_the_schedule_exactly(tmp_path, late_restore):
    """With the restore after ``on_fit_start`` (the sharding strategies) the allocator state used to stay pending
    and the resumed run started from fresh scores and masks."""

    def run(max_epochs, ckpt_path=None):
        L.seed_everything(0)
        module = TinyLM()
        ada = AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=3, delta_t=1, target_modules="all-linear", total_steps=12)
        probe = Probe(ada)
        cbs = [ada, probe, ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1)]
        strategy = LateRestore(device="cpu") if late_restore else "auto"
        trainer(tmp_path, cbs, max_epochs=max_epochs, max_steps=-1, enable_checkpointing=True, strategy=strategy).fit(module, ckpt_path=ckpt_path)
        return module, ada, probe

    straight, ada_s, probe_s = run(max_epochs=3)
    with pytest.warns(UserWarning, match="before the final allocation"):
        run(max_epochs=1)  # 4 steps, checkpoint at the end of epoch 0
    ckpt = torch.load(tmp_path / "ck" / "epoch=0-step=4.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("AdaLoRA"))
    assert state["allocator"]["step"] == 3 and state["allocator"]["ema_ipt"]
    resumed, ada_r, probe_r = run(max_epochs=3, ckpt_path=tmp_path / "ck" / "epoch=0-step=4.ckpt")
    assert len(probe_r.masks) == 8
    for ms, mr in zip(probe_s.masks[4:], probe_r.masks):
        assert all(torch.equal(ms[n], mr[n]) for n in ms)
    assert ada_s.final_ranks == ada_r.final_ranks
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_save_dir_writes_peft_adalora_that_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    L.seed_everything(0)
    module = TinyLM()
    ada = AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=3, target_modules=["q_proj", "v_proj"], save_dir=str(tmp_path / "adapter"))
    trainer(tmp_path, [ada], max_steps=10).fit(module)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 10 and config["tfinal"] == 3
    assert {k[: -len(".lora_E")]: sum(v) for k, v in config["rank_pattern"].items()} == {k[len("model."):]: r for k, r in ada.final_ranks.items()}
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    ids = torch.randint(0, 128, (2, 10))
    module.eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, module.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # and back: lightning-peft's load_adapter reads it through the registered ADALORA format
    from lightning_peft.io import load_adapter

    fresh = load_adapter(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(fresh(input_ids=ids).logits, module.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_schedule_longer_than_the_run_is_refused(tmp_path):
    module = TinyLM()
    ada = AdaLoRA(init_r=4, target_r=2, tinit=5, tfinal=7, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"tinit=5 \+ tfinal=7 >= 12 optimizer steps \(trainer.estimated_stepping_batches\)"):
        trainer(tmp_path, [ada], max_steps=12).fit(module)
    with pytest.raises(ValueError, match=r"tinit=5 \+ tfinal=7 >= total_steps=10"):
        AdaLoRA(tinit=5, tfinal=7, total_steps=10)


def test_adalora_with_lora_on_the_same_layers_is_refused(tmp_path):
    module = TinyLM()
    with pytest.raises(ValueError, match=r"AdaLoRA cannot wrap layers that already carry an adapter \(LoRALinear\)"):
        trainer(tmp_path, [LoRA(r=4, target_modules=["q_proj"]), AdaLoRA(target_modules=["q_proj"])]).fit(module)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init_r": 4, "target_r": 8}, "target_r=8 is larger than init_r=4"), ({"beta1": 1.5}, r"\(0, 1\)"), ({"beta2": 0}, r"\(0, 1\)"),
        ({"tinit": 1.5}, r"tinit=1.5: give a number of optimizer steps \(an integer >= 0\) or a fraction of the run in \(0, 1\)"),
        ({"tfinal": -2}, r"tfinal=-2: give a number of optimizer steps"),
        ({"budget": "triplets"}, r"budget='triplets': choose 'rank' .* or 'params'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoRA(**kwargs)


def test_config_parses_in_the_cli(minilm_path, monkeypatch):
    import contextlib
    import io
    from pathlib import Path

    import yaml

    from lightning_peft.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "configs/adalora.yaml", "--trainer.callbacks.init_args.target_r=6", "--print_config"])
    assert exc.value.code in (0, None)
    cb = yaml.safe_load(buf.getvalue())["trainer"]["callbacks"][0]
    from jsonargparse.typing import import_object  # jsonargparse prints the shortest import path (it varies by version)

    from lightning_peft.callbacks.adalora import AdaLoRA

    assert import_object(cb["class_path"]) is AdaLoRA
    assert (cb["init_args"]["init_r"], cb["init_args"]["target_r"], cb["init_args"]["tfinal"]) == (12, 6, 150)


def test_fsdp1_without_orig_params_is_refused_with_the_fix():
    """FSDP1 with use_orig_params=False holds the adapter only inside flat parameters; Lightning's default (True) works
    (tests/test_sharded.py)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = TinyLM()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"AdaLoRA under the FSDPStrategy needs use_orig_params=True"):
        AdaLoRA(init_r=4, target_r=2, total_steps=10).setup(SimpleNamespace(strategy=FSDPStrategy(use_orig_params=False), callbacks=[]), module, "fit")
    assert module.state_dict().keys() == before.keys()


def test_the_whole_tensor_access_is_chosen_at_fit_start_after_configure_model(tmp_path):
    """A model built in ``configure_model`` gets its adapters after ``setup``: the strategy's access object must
    still be chosen (it used to be picked in setup, when the allocator did not exist yet, leaving the one for
    unsharded parameters under DeepSpeed: ZeRO-2's gradients were then never read)."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lightning_peft.distributed import ShardedTensors
    from tests.callbacks.helpers import TinyLMConfigureModel

    class FakeDeepSpeedStrategy(SingleDeviceStrategy):  # named like DeepSpeed; ShardedTensors passes plain tensors through
        pass

    ada = AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=1, total_steps=4, heatmap=False, log_ranks=False)
    trainer(tmp_path, [ada], max_steps=4, strategy=FakeDeepSpeedStrategy(device="cpu")).fit(TinyLMConfigureModel())
    assert isinstance(ada.allocator.access, ShardedTensors)
    assert ada.allocator.step == 3 and ada.allocator.finalized  # every optimizer step went through it
