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
from typing import Any, Optional

__all__ = ["chat_main", "generate_main"]

_FORMATS = ("auto", "instruction", "chat")


def _parser(prog: str, description: str):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Optional[str], default=None, help="The run's config: a config file or a shipped config's name (default: the config.yaml LightningCLI saved beside --ckpt_path).")
    parser.add_argument("--adapter", type=Optional[str], default=None, help="A PEFT-format adapter directory (what save_dir or `lightning-peft export` wrote).")
    parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="A Lightning checkpoint of the run (instead of --adapter).")
    parser.add_argument("--format", type=str, default="auto", help="Prompt formatting: instruction, chat, or auto (chat if the data config sets chat_template or its train_file holds `messages`).")
    parser.add_argument("--system", type=Optional[str], default=None, help="Chat: a system message before the user's.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Most tokens generated per response.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding; > 0: sampling at this temperature.")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling (with temperature > 0).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of sampling.")
    return parser


def _load(cfg: Any) -> tuple[Any, Any, Path]:
    """The LightningModule with the adapter loaded, the config's data settings, and the config's path."""
    import yaml

    from lightning_peft.callbacks.base import load_adapter_checkpoint, read_checkpoint, read_checkpoint_directory
    from lightning_peft.cli import _build_model, _find_run_config, resolve_config_arg
    from lightning_peft.io import load_adapter

    if (cfg.adapter is None) == (cfg.ckpt_path is None):
        raise ValueError("Pass the trained adapter: either --adapter <PEFT-format directory> or --ckpt_path <checkpoint>.")
    if cfg.config is not None:
        config_path = Path(resolve_config_arg(cfg.config))
    elif cfg.ckpt_path is not None:
        config_path = _find_run_config(Path(cfg.ckpt_path))
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
    module = _build_model(config_path)
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
    from lightning_peft.cli import resolve_config_paths
    from lightning_peft.tasks import PromptFormatter, load_tokenizer
    from lightning_peft.tasks.data import read_table

    if fmt not in _FORMATS:
        raise ValueError(f"--format must be one of {list(_FORMATS)}, got {fmt!r}.")
    data_args = resolve_config_paths(data_args, config_path.parent)
    keys = ("prompt_template", "chat_template", "instruction_column", "input_column", "output_column", "messages_column")
    tokenizer = load_tokenizer(data_args["tokenizer_name_or_path"]) if data_args.get("tokenizer_name_or_path") else module.tokenizer
    formatter = PromptFormatter(tokenizer, **{k: data_args[k] for k in keys if data_args.get(k) is not None})
    if fmt == "auto":
        chat = data_args.get("chat_template") is not None
        train_file = data_args.get("train_file")
        if not chat and isinstance(train_file, str) and Path(train_file).is_file():
            rows = read_table(train_file)
            chat = bool(rows) and formatter.is_chat(rows[0])
        fmt = "chat" if chat else "instruction"
    return formatter, fmt == "chat"


def _row(text: str, chat: bool, formatter: Any, system: Optional[str]) -> dict[str, Any]:
    if not chat:
        return {formatter.instruction_column: text}
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return {formatter.messages_column: messages}


def generate_main(args: list[str]) -> list[dict[str, Any]]:
    """``lightning-peft generate``: responses to prompts from the command line or a file."""
    import torch

    from lightning_peft.tasks.generation import check_generation_args, generate_ids
    from lightning_peft.tasks.data import read_table

    parser = _parser("lightning-peft generate", "Generate responses with a trained causal-LM adapter, prompts formatted as in training.")
    parser.add_argument("--prompt", type=str, action="append", default=[], help="A prompt (an instruction, or a chat user message); repeat for several.")
    parser.add_argument("--prompts_file", type=Optional[str], default=None, help="A .json/.jsonl file of prompts, rows as the training data's (instruction rows or `messages`; a final assistant message is dropped).")
    parser.add_argument("--output", type=Optional[str], default=None, help="Write one JSON object per prompt (prompt, completion, tokens) to this .jsonl file.")
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts generated together.")
    cfg = parser.parse_args(args)
    check_generation_args("lightning-peft generate", cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    if not cfg.prompt and cfg.prompts_file is None:
        raise ValueError("Nothing to generate from: pass --prompt TEXT (repeatable) and/or --prompts_file FILE.")
    module, data_args, config_path = _load(cfg)
    formatter, chat = _formatter(module, data_args, config_path, cfg.format)
    rows = [_row(text, chat, formatter, cfg.system) for text in cfg.prompt]
    if cfg.prompts_file is not None:
        rows += read_table(cfg.prompts_file)
    prompts = [formatter.encode_prompt(row) for row in rows]
    torch.manual_seed(cfg.seed)
    outputs = generate_ids(module.model, formatter.tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    results = []
    for row, prompt, new in zip(rows, prompts, outputs):
        completion = formatter.tokenizer.decode(new, skip_special_tokens=True)
        results.append({"prompt": formatter.tokenizer.decode(prompt, skip_special_tokens=False), "completion": completion, "tokens": new})
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

    from lightning_peft.tasks.generation import check_generation_args, generate_ids

    cfg = _parser("lightning-peft chat", "Talk to a trained causal-LM adapter: type a message and press enter; /reset starts over, /exit (or end of input) quits.").parse_args(args)
    check_generation_args("lightning-peft chat", cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    module, data_args, config_path = _load(cfg)
    formatter, chat = _formatter(module, data_args, config_path, cfg.format)
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
            history.append({"role": "user", "content": text})
            row = {formatter.messages_column: history}
        else:
            row = {formatter.instruction_column: text}
        new = generate_ids(module.model, formatter.tokenizer, [formatter.encode_prompt(row)], cfg.max_new_tokens, cfg.temperature, cfg.top_p)[0]
        reply = formatter.tokenizer.decode(new, skip_special_tokens=True)
        if chat:
            history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
