"""LoRA trained under a sharding strategy on 2 CPU processes, against one process fed the same global batches.

Run by tests/test_sharded.py as ``python sharded_equivalence.py STRATEGY CKPT PHASE OUT [METHOD]`` where

- STRATEGY: ``single`` (one process), ``ddp`` (Lightning's DDP, for the same checks), ``ds2`` / ``ds3`` (DeepSpeed ZeRO-2 / ZeRO-3), ``fsdp2`` (Lightning's ModelParallelStrategy; the LightningModule builds its
  model in ``__init__`` and shards it with ``fully_shard`` in ``configure_model``, as Lightning documents),
  ``fsdp2_mixin`` (the model built in ``configure_model``, adapters added there with ``apply_peft`` before
  ``fully_shard``), ``fsdp2_late`` (the model built and sharded in ``configure_model`` with the LoRA callback: refused);
- CKPT: ``file`` (one checkpoint file) or ``dist`` (a distributed checkpoint directory);
- METHOD (optional): ``lora`` (default), ``ia3``, ``adalora``, ``prompt_tuning``;
- PHASE: ``full`` (2 epochs, a checkpoint after each, the adapter written with ``save_dir``) or ``resume`` (from the
  epoch-0 checkpoint of the ``full`` run in OUT).

With ``LP_SHARDED_ACCELERATOR=cuda`` (tests/test_sharded_gpu.py, 2 GPUs): Lightning's own strategy classes on NCCL,
``bf16-mixed`` precision.

Data: 2 epochs of 4 steps of 4 rows, unshuffled (2 rows per rank under 2 processes); SGD with momentum. The adapter
starts from one fixed draw in every run, set in ``setup`` (after the callback added it, before any sharding) or, with
``apply_peft``, in ``configure_model`` before ``fully_shard``. Writes ``OUT/<strategy>_<ckpt>_<phase>.pt`` from rank 0:
the trained adapter gathered from every rank (``lightning_peft.distributed.gather_adapter``), rank 0's per-step
losses, and the error of the Trainer call, if any.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft.distributed import gather_adapter  # noqa: E402
from tests.callbacks.helpers import TinyLM, token_data  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402

STEPS_PER_EPOCH, GLOBAL_BATCH, EPOCHS = 4, 4, 2
LORA = dict(r=4, alpha=8, target_modules="all-linear")


def method(name: str, save_dir=None):
    """The PEFT callback of ``name`` (``lora`` by default), writing its adapter to ``save_dir`` at the end of fit."""
    if name == "lora":
        return lp.LoRA(**LORA, save_dir=save_dir)
    if name == "ia3":
        return lp.IA3(save_dir=save_dir)
    if name == "adalora":
        return lp.AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=1, total_steps=STEPS_PER_EPOCH * EPOCHS,
                          target_modules="all-linear", heatmap=False, log_ranks=False, save_dir=save_dir)
    if name == "prompt_tuning":
        return lp.PromptTuning(num_virtual_tokens=4, init="random", save_dir=save_dir)
    raise SystemExit(f"unknown method {name}")


def fixed_start(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


def shard(module: L.LightningModule) -> None:
    from torch.distributed.fsdp import fully_shard

    mesh = module.device_mesh["data_parallel"]
    for layer in module.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module.model, mesh=mesh)


class Net(TinyLM):
    """The model built in ``__init__``; the callback adds LoRA at setup, then ``setup`` sets the fixed start."""

    def __init__(self):
        super().__init__(opt="trainable", n=STEPS_PER_EPOCH * GLOBAL_BATCH)
        self.losses = []

    def setup(self, stage):
        fixed_start(self)  # after the callback's setup (callbacks first); a resumed run's restore comes later

    def configure_optimizers(self):
        # SGD with momentum: its state must resume exactly, and unlike Adam it does not blow float-reduction-order noise
        # in near-zero gradients up to full-size steps, so one process and two agree closely
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5, momentum=0.9)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.detach().item())
        return loss

    def train_dataloader(self):
        data = TensorDataset(token_data(self.n))
        world = self.trainer.world_size
        sampler = DistributedSampler(data, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)


class NetFSDP2(Net):
    """As Lightning documents FSDP2: ``configure_model`` shards the model built in ``__init__``."""

    def configure_model(self):
        if not getattr(self, "_sharded", False):
            self._sharded = True
            shard(self)


class NetMixin(lp.PEFTMixin, NetFSDP2):
    """The model built in ``configure_model``, adapters added there before ``fully_shard``."""

    def build(self):
        return None

    def configure_model(self):
        if self.model is None:
            self.model = tiny_llama(seed=0).train()
            self.apply_peft(lp.LoRA(**LORA))
            fixed_start(self)
            shard(self)

    def setup(self, stage):
        pass


class NetLate(NetFSDP2):
    """The model built and sharded in ``configure_model``, with the LoRA callback: too late to add adapters."""

    def build(self):
        return None

    def configure_model(self):
        if self.model is None:
            self.model = tiny_llama(seed=0).train()
            shard(self)

    def setup(self, stage):
        pass


def main() -> None:
    strategy_name, ckpt_kind, phase, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    method_name = sys.argv[5] if len(sys.argv) > 5 else "lora"
    tag = f"{strategy_name}_{ckpt_kind}" + ("" if method_name == "lora" else f"_{method_name}")
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = {"fsdp2": NetFSDP2, "fsdp2_mixin": NetMixin, "fsdp2_late": NetLate}.get(strategy_name, Net)()
    callbacks = [] if strategy_name == "fsdp2_mixin" else [method(method_name, save_dir=str(out / f"{tag}_{phase}_export"))]
    gpu = os.environ.get("LP_SHARDED_ACCELERATOR") == "cuda"  # GPUs: Lightning's own strategies, NCCL, bf16-mixed
    if strategy_name == "single":
        strategy, devices = "auto", 1
    elif strategy_name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy, devices = DDPStrategy(timeout=timedelta(seconds=60)), 2
    elif strategy_name in ("ds2", "ds3"):  # DeepSpeed through a test-only subclass that skips its CUDA-only checks
        from lightning.pytorch.strategies import DeepSpeedStrategy

        from tests.scripts.cpu_strategies import CPUDeepSpeedStrategy

        cls = DeepSpeedStrategy if gpu else CPUDeepSpeedStrategy
        strategy, devices = cls(stage=int(strategy_name[-1]), timeout=timedelta(seconds=60)), 2
        if strategy_name == "ds3":  # not an __init__ argument; else a tiny model is never partitioned
            strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    elif strategy_name == "fsdp1":  # FSDP1 through a test-only subclass (device_id on the CPU, no CPU offload)
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        from lightning.pytorch.strategies import FSDPStrategy

        from tests.scripts.cpu_strategies import CPUFSDPStrategy

        strategy, devices = (FSDPStrategy if gpu else CPUFSDPStrategy)(
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), state_dict_type="full" if ckpt_kind == "file" else "sharded",
            timeout=timedelta(seconds=60),
        ), 2
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy, devices = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=ckpt_kind == "dist", timeout=timedelta(seconds=60),
        ), 2
    ckpt_dir = out / f"{tag}_ckpt"
    callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True))
    trainer = L.Trainer(
        accelerator="cuda" if gpu else "cpu", devices=devices, strategy=strategy, precision="bf16-mixed" if gpu else "32-true",
        max_epochs=EPOCHS, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=callbacks,
    )
    resume = None
    if phase == "resume":
        resume = next(p for p in sorted(ckpt_dir.iterdir()) if p.name.startswith("epoch=0"))
        resume = str(resume)
    try:
        trainer.fit(module, ckpt_path=resume)
        error = None
    except Exception as err:  # noqa: BLE001 - reported to the test
        error = f"{type(err).__name__}: {err}"
        import traceback

        traceback.print_exc()  # the whole story in the log the test prints on failure
    adapter = gather_adapter(module, root=trainer.strategy.model) if error is None else {}
    if trainer.global_rank == 0:
        torch.save({"adapter": {k: v.float() for k, v in adapter.items()}, "losses": module.losses, "error": error},
                   out / f"{tag}_{phase}.pt")
    if error is not None and devices == 1:
        raise SystemExit(error)
    if devices > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush(), sys.stderr.flush()
    # the results are written: leave without the interpreter's teardown, where DeepSpeed's CPU communication op has
    # aborted now and then ("terminate called without an active exception", exit -6) after all work was done
    os._exit(0)
