"""Text generation from token prompts with a Hugging Face causal LM (adapters active), shared by
``CausalLM.predict_step`` and the ``lightning-peft generate``/``chat`` commands."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

__all__ = ["check_generation_args", "generate_ids", "stop_token_id"]


def check_generation_args(owner: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"{owner}: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}.")
    if temperature < 0:
        raise ValueError(f"{owner}: temperature must be >= 0 (0 is greedy decoding), got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"{owner}: top_p must be in (0, 1], got {top_p}.")


def stop_token_id(tokenizer: Any) -> Optional[int]:
    """The token that ends a response: the eos token, else the sep token (as training appends it)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


@torch.inference_mode()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
) -> list[list[int]]:
    """The new tokens a model generates after each prompt (token ids), up to and including the stop token.

    Prompts are left-padded in batches of ``batch_size``. ``temperature=0`` is greedy decoding; otherwise tokens are
    sampled (from torch's global generator: seed it for repeatable samples) with ``temperature`` and nucleus ``top_p``.
    The model runs in eval mode (dropout off) and is put back in the mode it was in.
    """
    check_generation_args("generate", max_new_tokens, temperature, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty.")
    stop = stop_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    if pad is None:
        raise ValueError("The tokenizer has no pad, eos or sep token to pad prompts with.")
    sampling = (
        {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": None}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            longest = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (longest - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in chunk], device=device)
            generated = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                eos_token_id=stop, **sampling,
            )
            for row in generated[:, longest:].tolist():
                if stop is not None and stop in row:
                    row = row[: row.index(stop) + 1]
                out.append(row)
    finally:
        model.train(was_training)
    return out
