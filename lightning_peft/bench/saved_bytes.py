"""Bytes autograd saves for backward during one training forward pass: deterministic, CPU-friendly.

Protocol (``../shared/BENCHMARKS.md``): count the unique storages that autograd saves in one forward
pass (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded. Tiny Llama in bf16
(hidden 256, intermediate 688, 2 layers, 4 heads, 2 KV heads, vocab 1000), batch 4 x 128, LoRA r=16,
alpha=32 on every Linear of the blocks.

Run: ``python -m lightning_peft.bench.saved_bytes``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["measure_saved_bytes", "saved_bytes_table", "tiny_llama"]


def tiny_llama(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """The tiny Llama shape of the protocol, random-initialized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(dtype)


def measure_saved_bytes(model: nn.Module, batch: torch.Tensor) -> int:
    """Bytes of the unique non-parameter storages saved for backward by one forward of ``model``."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs and not isinstance(t, nn.Parameter):
            storages[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def _ours(dropout: float, dora: bool = False) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        from lightning_peft import LoRA

        return LoRA(r=16, alpha=32, dropout=dropout, target_modules="all-linear", use_dora=dora).inject(model)

    return build


def _peft(dropout: float, dora: bool = False) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", use_dora=dora))

    return build


def saved_bytes_table(peers: bool = True, batch_size: int = 4, seq_len: int = 128) -> dict[str, int]:
    """``{row name: bytes}`` for full fine-tuning, our LoRA and DoRA (dropout 0 / 0.05) and, with ``peers``, HF PEFT's."""
    rows: dict[str, Callable[[nn.Module], nn.Module]] = {"full fine-tuning": lambda m: m}
    rows["lightning-peft LoRA, dropout 0"] = _ours(0.0)
    rows["lightning-peft LoRA, dropout 0.05"] = _ours(0.05)
    rows["lightning-peft DoRA, dropout 0"] = _ours(0.0, dora=True)
    rows["lightning-peft DoRA, dropout 0.05"] = _ours(0.05, dora=True)
    if peers:
        rows["HF PEFT LoRA, dropout 0"] = _peft(0.0)
        rows["HF PEFT LoRA, dropout 0.05"] = _peft(0.05)
        rows["HF PEFT DoRA, dropout 0"] = _peft(0.0, dora=True)
        rows["HF PEFT DoRA, dropout 0.05"] = _peft(0.05, dora=True)
    batch = torch.randint(0, 1000, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    return {name: measure_saved_bytes(build(tiny_llama()), batch) for name, build in rows.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-peft bench saved-bytes", description=__doc__.split("\n")[0])
    parser.add_argument("--no-peers", action="store_true", help="skip Hugging Face PEFT rows")
    args = parser.parse_args(argv)
    table = saved_bytes_table(peers=not args.no_peers)
    full = table["full fine-tuning"]
    peft0 = table.get("HF PEFT LoRA, dropout 0")
    print("| method | MiB saved | x full FT | x HF PEFT LoRA (dropout 0) |\n|---|---|---|---|")
    for name, nbytes in table.items():
        vs_peft = f"{nbytes / peft0:.2f}" if peft0 else "-"
        print(f"| {name} | {nbytes / 2**20:.2f} | {nbytes / full:.2f} | {vs_peft} |")


if __name__ == "__main__":
    main()
