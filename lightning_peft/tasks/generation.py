"""Text generation from token prompts with a Hugging Face causal LM (adapters active), shared by
``CausalLM.predict_step`` and the ``lightning-peft generate``/``chat`` commands."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch

__all__ = ["check_generation_args", "context_length", "generate_ids", "stop_token_id", "strip_stop"]


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


def context_length(model: Any) -> Optional[int]:
    """The most positions the model takes (prompt and generated tokens together), from its config
    (``max_position_embeddings``, GPT-2's ``n_positions``, ...); None when the config names none."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def stop_token_id(tokenizer: Any) -> Optional[int]:
    """The token that ends a response: the eos token, else the sep token (as training appends it)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def _first_stop(row: list[int], stop_ids: set[int], stop_sequences: Sequence[Sequence[int]]) -> Optional[tuple[int, int]]:
    """``(start, end)`` of the first stop (a stop token, or a stop sequence) in ``row``, or None."""
    best: Optional[tuple[int, int]] = None
    for i, token in enumerate(row):
        if token in stop_ids:
            best = (i, i + 1)
            break
    for seq in stop_sequences:
        n = len(seq)
        for i in range(len(row) - n + 1):
            if best is not None and i >= best[0]:
                break
            if row[i : i + n] == list(seq):
                best = (i, i + n)
                break
    return best


def strip_stop(row: list[int], tokenizer: Any, stop_sequences: Sequence[Sequence[int]] = ()) -> list[int]:
    """``row`` without its final stop (the eos/sep token, or a chat template's turn end): the response's own tokens."""
    stop = stop_token_id(tokenizer)
    found = _first_stop(row, {stop} if stop is not None else set(), stop_sequences)
    return row if found is None or found[1] != len(row) else row[: found[0]]


def _ends_with(sequences: Sequence[Sequence[int]], prompt_length: int) -> Any:
    """A transformers stopping criterion: a row is done once its generated part ends with one of ``sequences``."""
    from transformers import StoppingCriteria

    class EndsWith(StoppingCriteria):
        def __init__(self) -> None:
            self.sequences = [torch.tensor(list(s)) for s in sequences if len(s)]

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for seq in self.sequences:
                if input_ids.shape[1] - prompt_length >= len(seq):
                    done |= (input_ids[:, -len(seq):] == seq.to(input_ids.device)).all(-1)
            return done

    return EndsWith()


@torch.inference_mode()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    stop_sequences: Sequence[Sequence[int]] = (),
) -> list[list[int]]:
    """The new tokens a model generates after each prompt (token ids), up to and including the stop.

    A response stops at the tokenizer's eos (else sep) token, at the model's own ``generation_config`` eos ids, or at
    one of ``stop_sequences`` (e.g. a chat template's turn end, :meth:`PromptFormatter.turn_end`). Prompts are
    left-padded in batches of ``batch_size``. ``temperature=0`` is greedy decoding (a model's own
    ``generation_config`` settings such as ``repetition_penalty`` still apply); otherwise tokens are sampled (from
    torch's global generator: seed it for repeatable samples) with ``temperature`` and nucleus ``top_p``. The model
    runs in eval mode (dropout off) and is put back in the mode it was in.
    """
    check_generation_args("generate", max_new_tokens, temperature, top_p)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generate: batch_size must be an integer >= 1, got {batch_size!r}.")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty.")
    stop = stop_token_id(tokenizer)
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    own = [own] if isinstance(own, int) else list(own or [])
    stop_ids = sorted({i for i in [stop, *own] if i is not None})
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
            criteria = [_ends_with(stop_sequences, longest)] if stop_sequences else None
            generated = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                eos_token_id=stop_ids or None, stopping_criteria=criteria, **sampling,
            )
            for row in generated[:, longest:].tolist():
                found = _first_stop(row, set(stop_ids), stop_sequences)
                out.append(row if found is None else row[: found[1]])  # what follows a stop is padding
    finally:
        model.train(was_training)
    return out
