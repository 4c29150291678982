"""``lightning-peft generate`` and ``lightning-peft chat``: use a trained causal-LM adapter.

The model is rebuilt from the run's config (the training config, or the ``config.yaml`` LightningCLI saved beside
the checkpoint), the adapter loaded from a PEFT-format directory (``save_dir``, ``export``) or from a checkpoint,
and prompts are formatted by the config's data settings exactly as in training (:class:`PromptFormatter`: the same
template, the same special tokens).

Examples::

    lightning-peft generate --config lora_causal_lm --adapter outputs/lora_causal_lm/adapter --prompt "Add 2 and 3."
    lightning-peft generate --ckpt_path runs/version_0/checkpoints/last.ckpt --prompts_file prompts.jsonl --output out.jsonl
    lightning-peft chat --config chat --adapter outputs/chat/adapter
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal, Optional

__all__ = ["chat_main", "generate_main"]


def _parser(prog: str, description: str):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Optional[str], default=None, help="The run's config: a config file or a shipped config's name (default: the config.yaml LightningCLI saved beside --ckpt_path).")
    parser.add_argument("--adapter", type=Optional[str], default=None, help="A PEFT-format adapter directory (what save_dir or `lightning-peft export` wrote).")
    parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="A Lightning checkpoint of the run (instead of --adapter).")
    parser.add_argument("--format", type=Literal["auto", "instruction", "chat"], default="auto", help="Prompt formatting: instruction, chat, or auto (chat if the data config sets chat_template or its train_file holds `messages`).")
    parser.add_argument("--system", type=Optional[str], default=None, help="Chat: a system message first in every prompt (--prompts_file rows included; a row with its own is refused).")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Most tokens generated per response.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding; > 0: sampling at this temperature.")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling (with temperature > 0).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of sampling.")
    parser.add_argument("--device", type=str, default="auto", help="Where the model runs: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", type=Literal["float32", "bfloat16", "float16"], default="float32", help="The model's dtype for generation.")
    return parser


def _place(module: Any, device: str, dtype: str) -> None:
    import torch

    target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        module.to(device=torch.device(target), dtype=getattr(torch, dtype))
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"--device {device!r} / --dtype {dtype!r}: the model cannot be placed there ({err}).") from None


def _load(cfg: Any) -> tuple[Any, Any, Path]:
    """The LightningModule with the adapter loaded, the config's data settings, and the config's path."""
    import yaml

    from lightning_peft.callbacks.base import load_adapter_checkpoint, read_checkpoint, read_checkpoint_directory
    from lightning_peft.run_config import build_model, find_run_config, resolve_config_arg
    from lightning_peft.io import load_adapter

    if (cfg.adapter is None) == (cfg.ckpt_path is None):
        raise ValueError("Pass the trained adapter: either --adapter <PEFT-format directory> or --ckpt_path <checkpoint>.")
    if cfg.config is not None:
        config_path = Path(resolve_config_arg(cfg.config))
    elif cfg.ckpt_path is not None:
        config_path = find_run_config(Path(cfg.ckpt_path))
    else:
        raise ValueError("--adapter needs the run's --config (the model and the prompt format are read from it).")
    if not config_path.is_file():
        raise FileNotFoundError(f"Config {config_path} does not exist.")
    if cfg.ckpt_path is not None:
        ckpt = Path(cfg.ckpt_path)
        if not ckpt.exists():
            raise FileNotFoundError(f"Checkpoint {ckpt} does not exist.")
        checkpoint = read_checkpoint_directory(ckpt) if ckpt.is_dir() else read_checkpoint(ckpt)  # weights only
    elif not Path(cfg.adapter).is_dir():
        raise FileNotFoundError(f"Adapter directory {cfg.adapter} does not exist.")
    module = build_model(config_path)
    if getattr(module, "tokenizer", None) is None or not hasattr(getattr(module, "model", None), "generate"):
        raise TypeError(f"{type(module).__name__} (from {config_path}) is not a causal LM with a tokenizer: generate needs CausalLM or the like.")
    if cfg.ckpt_path is not None:
        load_adapter_checkpoint(module, checkpoint)
    else:
        load_adapter(module, cfg.adapter)
    data = (yaml.safe_load(config_path.read_text()) or {}).get("data") or {}
    data_args = (data.get("init_args") or {}) if isinstance(data, dict) else {}
    return module, data_args, config_path


def _formatter(module: Any, data_args: dict[str, Any], config_path: Path, fmt: str):
    from lightning_peft.run_config import resolve_config_paths
    from lightning_peft.tasks import PromptFormatter, load_tokenizer

    data_args = resolve_config_paths(data_args, config_path.parent)
    keys = ("prompt_template", "chat_template", "instruction_column", "input_column", "output_column", "messages_column")
    tokenizer = load_tokenizer(data_args["tokenizer_name_or_path"]) if data_args.get("tokenizer_name_or_path") else module.tokenizer
    formatter = PromptFormatter(tokenizer, **{k: data_args[k] for k in keys if data_args.get(k) is not None})
    if fmt == "auto":
        chat = data_args.get("chat_template") is not None
        train_file = data_args.get("train_file")
        if not chat:
            if not (isinstance(train_file, str) and Path(train_file).is_file()):
                raise ValueError(
                    f"--format auto cannot tell instruction from chat prompts: {config_path} sets no chat_template and its"
                    f" train_file {train_file!r} cannot be read here. Pass --format chat or --format instruction (as the"
                    " model was trained)."
                )
            chat = formatter.is_chat(_first_row(train_file))
        fmt = "chat" if chat else "instruction"
    return formatter, fmt == "chat"


def _first_row(path: str) -> dict[str, Any]:
    from lightning_peft.tasks.data import read_table

    if path.endswith(".jsonl"):  # the first row only, not the whole training file
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return row if isinstance(row, dict) else {}
        return {}
    rows = read_table(path)
    return rows[0] if rows else {}


def _row(text: str, chat: bool, formatter: Any, system: Optional[str]) -> dict[str, Any]:
    if not chat:
        return {formatter.instruction_column: text}
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return {formatter.messages_column: messages}


def _check_system(system: Optional[str], chat: bool) -> None:
    if system is not None and not chat:
        raise ValueError(
            f"--system {system[:60]!r}: a system message is part of chat prompts, and this run formats its prompts as"
            " instructions (--format instruction, or a model trained on instruction rows). Drop --system, or pass"
            " --format chat if the model was trained on conversations."
        )


def _with_system(row: dict[str, Any], i: int, formatter: Any, system: Optional[str]) -> dict[str, Any]:
    """A --prompts_file row with --system's message first; a row with its own system message, or an instruction row,
    would leave one of the two unused: refused."""
    if system is None:
        return row
    messages = row.get(formatter.messages_column) if isinstance(row, dict) else None
    if not isinstance(messages, list):
        raise ValueError(
            f"--system: prompt {i} of --prompts_file is not a conversation (no {formatter.messages_column!r} list), so"
            " it has no place for a system message. Give the file's rows as conversations, or drop --system."
        )
    if any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        raise ValueError(
            f"--system: prompt {i} of --prompts_file has its own system message; one of the two would be ignored."
            " Drop --system, or the system messages in the file."
        )
    return {**row, formatter.messages_column: [{"role": "system", "content": system}, *messages]}


def _fit_history(formatter: Any, history: list[dict[str, str]], limit: Optional[int], max_new_tokens: int):
    """The chat prompt of ``history`` and the history it was made from: the earliest exchanges dropped (a system
    message kept) until the prompt and ``max_new_tokens`` fit the model's ``limit`` of positions; ``(None, [])``
    when the last message alone does not fit."""
    row = {formatter.messages_column: history}
    prompt = formatter.encode_prompt(row)
    if limit is None or len(prompt) + max_new_tokens <= limit:
        return prompt, history
    system = history[:1] if history[0]["role"] == "system" else []
    turns = history[len(system):]
    while len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # start at a user message, as a conversation does
            turns = turns[1:]
        kept = system + turns
        prompt = formatter.encode_prompt({formatter.messages_column: kept})
        if len(prompt) + max_new_tokens <= limit:
            return prompt, kept
    return None, []


def generate_main(args: list[str]) -> list[dict[str, Any]]:
    """``lightning-peft generate``: responses to prompts from the command line or a file."""
    import torch

    from lightning_peft.tasks.data import read_table
    from lightning_peft.tasks.generation import check_generation_args, context_length, generate_ids, strip_stop

    parser = _parser("lightning-peft generate", "Generate responses with a trained causal-LM adapter, prompts formatted as in training.")
    parser.add_argument("--prompt", action="append", default=[], help="A prompt (an instruction, or a chat user message); repeat for several.")
    parser.add_argument("--prompts_file", type=Optional[str], default=None, help="A .json/.jsonl file of prompts, rows as the training data's (instruction rows or `messages`; a final assistant message is dropped).")
    parser.add_argument("--output", type=Optional[str], default=None, help="Write one JSON object per prompt (prompt, completion, tokens) to this .jsonl file.")
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts generated together.")
    cfg = parser.parse_args(args)
    cfg.system = cfg.system or None  # --system "" is no system message, everywhere
    check_generation_args("lightning-peft generate", cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    if not cfg.prompt and cfg.prompts_file is None:
        raise ValueError("Nothing to generate from: pass --prompt TEXT (repeatable) and/or --prompts_file FILE.")
    if isinstance(cfg.batch_size, bool) or cfg.batch_size < 1:
        raise ValueError(f"--batch_size must be an integer >= 1, got {cfg.batch_size!r}.")
    module, data_args, config_path = _load(cfg)
    _place(module, cfg.device, cfg.dtype)
    formatter, chat = _formatter(module, data_args, config_path, cfg.format)
    _check_system(cfg.system, chat)
    rows = [_row(text, chat, formatter, cfg.system) for text in cfg.prompt]
    if cfg.prompts_file is not None:
        rows += [_with_system(row, i, formatter, cfg.system) for i, row in enumerate(read_table(cfg.prompts_file), start=1)]
    limit = context_length(module.model)
    prompts = []
    for i, row in enumerate(rows, start=1):
        try:
            prompts.append(formatter.encode_prompt(row))
        except (KeyError, ValueError) as err:
            raise ValueError(f"prompt {i} ({json.dumps(row, ensure_ascii=False)[:120]}): {err}") from None
        if limit is not None and len(prompts[-1]) + cfg.max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} ({json.dumps(row, ensure_ascii=False)[:80]}) is {len(prompts[-1])} tokens: with"
                f" --max_new_tokens {cfg.max_new_tokens} it passes the model's context of {limit} positions. Shorten"
                " it, or lower --max_new_tokens."
            )
    stops = [formatter.turn_end()] if chat else []
    stops = [s for s in stops if s]
    torch.manual_seed(cfg.seed)
    outputs = generate_ids(module.model, formatter.tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size, stops)
    results = []
    for row, prompt, new in zip(rows, prompts, outputs):
        completion = formatter.tokenizer.decode(strip_stop(new, formatter.tokenizer, stops), skip_special_tokens=True)
        results.append({"prompt": formatter.tokenizer.decode(prompt, skip_special_tokens=True), "completion": completion, "tokens": new})
        print(completion if len(rows) == 1 else f"### {json.dumps(row, ensure_ascii=False)}\n{completion}\n")
    if cfg.output is not None:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
        print(f"{len(results)} responses written to {out}", file=sys.stderr)
    return results


def chat_main(args: list[str], stdin: Any = None) -> None:
    """``lightning-peft chat``: an interactive conversation (one user message per line; /reset, /exit)."""
    import torch

    from lightning_peft.tasks.generation import check_generation_args, context_length, generate_ids, strip_stop

    cfg = _parser("lightning-peft chat", "Talk to a trained causal-LM adapter: type a message and press enter; /reset starts over, /exit (or end of input) quits.").parse_args(args)
    cfg.system = cfg.system or None  # --system "" is no system message
    check_generation_args("lightning-peft chat", cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    module, data_args, config_path = _load(cfg)
    _place(module, cfg.device, cfg.dtype)
    formatter, chat = _formatter(module, data_args, config_path, cfg.format)
    _check_system(cfg.system, chat)
    stops = [end for end in ([formatter.turn_end()] if chat else []) if end]
    limit = context_length(module.model)
    if not chat:
        print("(instruction format: each message is a new instruction; the conversation is not kept)", file=sys.stderr)
    stdin = sys.stdin if stdin is None else stdin
    torch.manual_seed(cfg.seed)
    history: list[dict[str, str]] = [{"role": "system", "content": cfg.system}] if chat and cfg.system else []
    interactive = stdin.isatty() if hasattr(stdin, "isatty") else False
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = history[:1] if history and history[0]["role"] == "system" else []
            print("(conversation reset)")
            continue
        if not text.strip():
            continue
        if chat:
            prompt, kept = _fit_history(formatter, [*history, {"role": "user", "content": text}], limit, cfg.max_new_tokens)
        else:
            prompt = formatter.encode_prompt({formatter.instruction_column: text})
            prompt = prompt if limit is None or len(prompt) + cfg.max_new_tokens <= limit else None
        if prompt is None:
            with_system = " with the system message" if chat and cfg.system else ""
            print(f"(not sent: the message{with_system} is too long for the model's context of {limit} positions with"
                  f" --max_new_tokens {cfg.max_new_tokens}; the conversation is as it was)", file=sys.stderr, flush=True)
            continue
        if chat:
            if len(kept) < len(history) + 1:
                print(f"(the {len(history) + 1 - len(kept)} earliest messages were dropped to fit the model's context of"
                      f" {limit} positions)", file=sys.stderr, flush=True)
            history = kept
        new = generate_ids(module.model, formatter.tokenizer, [prompt], cfg.max_new_tokens, cfg.temperature, cfg.top_p, stop_sequences=stops)[0]
        # the reply without its turn end: the template adds that back when the history is rendered
        reply = formatter.tokenizer.decode(strip_stop(new, formatter.tokenizer, stops), skip_special_tokens=True)
        if chat:
            history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
