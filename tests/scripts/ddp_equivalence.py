"""One method trained by 1 process (batch 4) or by DDP on 2 CPU processes (batch 2 each): the same global batches.

Run by tests/test_ddp.py as ``python ddp_equivalence.py METHOD DEVICES OUT``. Two things make a plain comparison
unfair, and are set aside here: Lightning's DDP always shuffles training data with its own DistributedSampler (here
``use_distributed_sampler=False`` and an unshuffled DistributedSampler, so step t sees rows 4t..4t+3 in both runs),
and it re-seeds every process before ``setup`` (so adapters would start from another random draw than the single
process's; here every trainable adapter tensor is set from a fixed generator when training starts). Each rank saves
its trained adapter tensors (and, for AdaLoRA, its rank masks at every step) to ``OUT/<devices>_rank<r>.pt``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

import lightning_peft as lp  # noqa: E402
from tests.callbacks.helpers import TinyLM, token_data  # noqa: E402

STEPS, GLOBAL_BATCH = 8, 4


class SplitLM(TinyLM):
    def train_dataloader(self):
        data = TensorDataset(token_data(self.n))
        world = self.trainer.world_size
        if world == 1:
            return DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False)
        sampler = DistributedSampler(data, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)


class FixedStart(L.Callback):
    """Same adapter values on every run; records AdaLoRA's masks after every step."""

    def __init__(self, adalora=None):
        self.adalora, self.masks, self.start = adalora, [], {}

    def on_train_start(self, trainer, pl_module):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in sorted(pl_module.named_parameters()):
                if p.requires_grad:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
        self.start = {k: v.detach().float().clone() for k, v in lp.adapter_state_dict(pl_module).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.adalora is not None:
            self.masks.append({n: m.rank_mask.clone() for n, m in self.adalora.layers.items()})


def make(method):
    plugins, cb = [], None
    if method == "lora":
        cb = lp.LoRA(r=4, alpha=8, target_modules="all-linear")
    elif method == "qlora":
        cb, plugins = lp.LoRA(r=4, alpha=8), [lp.QLoRAPrecision("nf4-dq", compute_dtype="fp32")]
    elif method == "adalora":
        cb = lp.AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=1, target_modules="all-linear", heatmap=False, log_ranks=False)
    elif method == "prompt_tuning":
        cb = lp.PromptTuning(num_virtual_tokens=4, init="random")
    elif method == "prefix_tuning":
        cb = lp.PrefixTuning(num_virtual_tokens=4)
    else:
        raise SystemExit(f"unknown method {method}")
    return cb, plugins


if __name__ == "__main__":
    method, devices, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = SplitLM(n=STEPS * GLOBAL_BATCH, lr=1e-2)
    cb, plugins = make(method)
    probe = FixedStart(cb if method == "adalora" else None)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=STEPS, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
        plugins=plugins, callbacks=[cb, probe],
    )
    trainer.fit(module)
    if method == "qlora":  # the frozen base stayed 4-bit on every rank
        from lightning_peft.quant import is_quantized

        assert is_quantized(module.model.model.layers[0].self_attn.q_proj.weight)
    trained = {k: v.detach().float().clone() for k, v in lp.adapter_state_dict(module).items()}
    torch.save({"adapter": trained, "start": probe.start, "masks": probe.masks, "final_ranks": getattr(cb, "final_ranks", None)},
               out / f"{devices}_rank{trainer.global_rank}.pt")
    if devices > 1:
        trainer.strategy.barrier()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
