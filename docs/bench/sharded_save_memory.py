"""Peak memory of saving a checkpoint under FSDP2 (Lightning's ModelParallelStrategy) or FSDP1 (FSDPStrategy, the
decoder layers wrapped, ``state_dict_type="full"``), 2 CPU processes, one file.

Lightning's own ``lightning_module_state_dict`` gathers the whole model on rank 0 for a single-file checkpoint (the
PEFT hook then drops the base); with lightning-peft's strategy support only the adapter tensors are gathered.
Under FSDP1 the adapter shares each wrapped unit's flat parameter with the base, so lightning-peft gathers one unit
at a time (those holding adapter tensors) and keeps only the adapter; Lightning's full state dict collects the whole
model on rank 0. DeepSpeed (``ds2``/``ds3``) writes a directory of per-rank files; without lightning-peft it holds
the frozen base too. Run: ``python docs/bench/sharded_save_memory.py ours|lightning [fsdp2|fsdp1|ds2|ds3]`` (``lightning`` skips
lightning-peft's strategy support, as if it were not there; FSDP1 runs through the test-only CPU subclass of
``tests/scripts/cpu_strategies.py``). Prints rank 0's resident-memory rise during ``trainer.save_checkpoint``
(sampled every 2 ms) and the file size.
"""

import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import psutil
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_peft as lp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(cfg)

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not getattr(self, "_sharded", False):
            self._sharded = True
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def train_dataloader(self):
        data = TensorDataset(torch.randint(0, 32000, (4, 16)))
        return DataLoader(data, batch_size=2, sampler=DistributedSampler(data, shuffle=False))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def peak_rise(fn):
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss - base)
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return peak[0]


def main():
    mode, kind = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "fsdp2"
    torch.set_num_threads(1)
    if kind == "fsdp1":
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        from tests.scripts.cpu_strategies import CPUFSDPStrategy

        strategy = CPUFSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), state_dict_type="full", timeout=timedelta(seconds=300))
    elif kind in ("ds2", "ds3"):
        from tests.scripts.cpu_strategies import CPUDeepSpeedStrategy

        strategy = CPUDeepSpeedStrategy(stage=int(kind[-1]), timeout=timedelta(seconds=300))
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    else:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False, timeout=timedelta(seconds=300))
    if mode == "lightning":
        strategy.__dict__["_lightning_peft_supported"] = True  # lightning-peft leaves the strategy as Lightning made it
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[lp.LoRA(r=16, alpha=32, target_modules="all-linear")])
    net = Net()
    n_base = sum(p.numel() for p in net.parameters())  # before sharding (FSDP1 then shows local shards)
    trainer.fit(net)
    path = Path(tempfile.gettempdir()) / f"sharded_save_{kind}_{mode}.ckpt"
    if trainer.global_rank == 0 and path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    trainer.strategy.barrier()
    rise = peak_rise(lambda: trainer.save_checkpoint(path))
    if trainer.global_rank == 0:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        print(f"{kind} {mode}: rank-0 RSS rise during save {rise / 2**20:.0f} MiB; checkpoint {size / 2**20:.1f} MiB; "
              f"base {n_base * 4 / 2**20:.0f} MiB fp32 ({n_base:,} params), sharded over 2 ranks")


if __name__ == "__main__":
    main()
