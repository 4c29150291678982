"""Instruction and chat data for causal-LM fine-tuning, and the one place that turns an example into tokens.

:class:`PromptFormatter` is shared by training (:class:`InstructionData`) and generation (``lightning-peft
generate``/``chat``, ``CausalLM.predict_step``), so a prompt at generation time is exactly the token sequence the
model saw before its responses in training.

Two kinds of example:

* **instruction** rows (``instruction`` / optional ``input`` / ``output``): ``[bos] + tokens(prompt) +
  tokens(output) + [eos]``, the prompt from the Alpaca template or ``prompt_template``; loss on the output and eos.
* **chat** rows (``messages``: a list of ``{"role", "content"}``): rendered with a chat template (the tokenizer's own,
  ``"chatml"``, a Jinja string or a ``.jinja`` file); loss on the assistant turns only. The rendered text is cut at
  every assistant turn and each piece is tokenized on its own (no bos/eos added: a template carries its own special
  tokens), so a conversation's prefix up to an assistant turn tokenizes exactly as the generation prompt does. The
  template's turn end (ChatML's ``<|im_end|>``) is part of the assistant piece, so the model learns it, and
  generation stops there (:meth:`PromptFormatter.turn_end`). Cutting has one cost: a tokenizer that treats the start
  of a text specially (SentencePiece's leading ``▁``) may tokenize the first word after a cut differently from
  ``apply_chat_template(tokenize=True)`` on the whole conversation; training and this package's generation agree
  with each other, a server tokenizing whole conversations may differ by that token.

With ``packing=True`` the training examples are packed into rows of up to ``max_length`` tokens (best-fit
decreasing, no example split). A packed batch has ``position_ids`` that restart at 0 for every example and no
``attention_mask``: transformers (>= 5.x, models built on ``create_causal_mask``: Llama, Qwen2, Mistral, GPT-2, OPT,
...) then masks attention to each example's own tokens, so a packed row computes what its examples would one by one.
This needs the model run without a cache (``use_cache=False``, as :class:`~lightning_peft.tasks.CausalLM` runs it):
with a cache transformers does not look for packed sequences. Other models (or older transformers) would attend
across examples; the loss stays on each example's own tokens but is no longer the unpacked one.
The first label of every packed example is -100 (it would otherwise be predicted from the previous example's end).
"""

from __future__ import annotations

import bisect
import random
import string
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lightning_peft.tasks._hf import ensure_pad_token, load_tokenizer
from lightning_peft.validation import check_value
from lightning_peft.tasks.data import (
    _check_loader_args,
    _ListDataset,
    _loader,
    _PadCollator,
    _resolve_tokenizer,
    _trained_batches,
    read_table,
)

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHATML_TEMPLATE",
    "InstructionData",
    "PromptFormatter",
    "alpaca_prompt",
    "pack_examples",
]

# The Stanford Alpaca templates (github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

#: ChatML, as TRL's ``setup_chat_format`` and Qwen use it: for tokenizers that ship no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE}


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one example: the template with an input if ``input`` is not blank."""
    if input.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _check_prompt_template(template: str) -> None:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if "instruction" not in fields or not fields <= {"instruction", "input"}:
        raise ValueError(
            f"prompt_template must contain the field {{instruction}} and may contain {{input}}, nothing else; got fields"
            f" {sorted(fields)} in {template!r}. Write literal braces as '{{{{' and '}}}}'."
        )


def _resolve_chat_template(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"chat_template must be None, 'chatml', a Jinja template or a .jinja file, got {value!r}.")
    if value.strip().lower() in _CHAT_TEMPLATES:
        return _CHAT_TEMPLATES[value.strip().lower()]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(
        f"chat_template {value!r} is neither a built-in name ({sorted(_CHAT_TEMPLATES)}), a Jinja template (with '{{{{' or"
        " '{%') nor an existing file. Pass None to use the tokenizer's own template."
    )


class PromptFormatter:
    """Turns instruction or chat examples into token ids and labels, and prompts into generation inputs.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt_template: Template of instruction prompts with ``{instruction}`` and optionally ``{input}``; None uses
            the Alpaca templates (with and without input).
        chat_template: For chat rows: None uses the tokenizer's ``chat_template``; ``"chatml"``; a Jinja template
            string; or the path of a ``.jinja`` file.
        instruction_column, input_column, output_column, messages_column: Field names of the examples.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_template: Optional[str] = None,
        chat_template: Optional[str] = None,
        instruction_column: str = "instruction",
        input_column: str = "input",
        output_column: str = "output",
        messages_column: str = "messages",
    ) -> None:
        if prompt_template is not None:
            _check_prompt_template(prompt_template)
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.chat_template = _resolve_chat_template(chat_template)
        self.instruction_column, self.input_column = instruction_column, input_column
        self.output_column, self.messages_column = output_column, messages_column

    # -- instruction rows --------------------------------------------------------------------------

    def prompt_text(self, row: dict[str, Any]) -> str:
        """The instruction prompt of a row (the text before its output)."""
        instruction, given = row.get(self.instruction_column), row.get(self.input_column) or ""
        if not isinstance(instruction, str) or not isinstance(given, str):
            raise ValueError(
                f"an example's {self.instruction_column!r} is {instruction!r} and its {self.input_column!r} {given!r}: both"
                f" must be strings (the input may be missing or empty). Fields found: {list(row)}."
            )
        if self.prompt_template is None:
            return alpaca_prompt(instruction, given)
        if given.strip() and "{input}" not in self.prompt_template:
            raise ValueError(
                f"An example has the input {given[:60]!r} but prompt_template has no {{input}} field, so the input would"
                f" be dropped. Add {{input}} to the template or clear the {self.input_column!r} fields."
            )
        return self.prompt_template.format(instruction=instruction, input=given)

    def _bos(self) -> list[int]:
        return [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

    def _eos(self) -> list[int]:
        tok = self.tokenizer
        eos_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        return [eos_id] if eos_id is not None else []

    # -- chat rows ---------------------------------------------------------------------------------

    def is_chat(self, row: dict[str, Any]) -> bool:
        return self.messages_column in row

    def turn_end(self) -> list[int]:
        """The tokens the chat template puts after an assistant message (ChatML: ``<|im_end|>``), as training
        tokenizes them: generation stops there (a chat template's turn end is often not the tokenizer's eos)."""
        sentinel = "\u2063lightning-peft-sentinel\u2063"
        text = self._render([{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}], add_generation_prompt=False)
        end = text.split(sentinel, 1)[1].strip() if sentinel in text else ""
        return self.tokenizer(end, add_special_tokens=False)["input_ids"] if end else []

    def _template(self) -> str:
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                "Chat examples need a chat template, and the tokenizer has none. Set chat_template: chatml (or a Jinja"
                " template / .jinja file) on the data, the same at training and generation."
            )
        if isinstance(template, dict):  # a tokenizer with named templates: the default one, as transformers does
            if "default" not in template:
                raise ValueError(
                    f"The tokenizer has several chat templates ({sorted(template)}) and none named 'default': pass"
                    " chat_template=<the template text or a .jinja file> to choose one."
                )
            template = template["default"]
        return template

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self._template(), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        messages = row[self.messages_column]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{self.messages_column!r} must be a non-empty list of messages, got {type(messages).__name__}.")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(
                    f"Message {i} of a conversation is {m!r}; every message must be an object with string 'role' and"
                    " 'content' fields."
                )
        return messages

    def _chat_pieces(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is an assistant turn) pieces, each a prefix-stable extension."""
        pieces: list[tuple[str, bool]] = []
        done = ""

        def extend(text: str, assistant: bool) -> None:
            nonlocal done
            if not text.startswith(done):
                raise ValueError(
                    "The chat template renders the earlier turns of a conversation differently once later turns are"
                    " added, so the loss cannot be put on each assistant turn and a generation prompt would not match"
                    f" training (rendered so far: {done[-80:]!r}; then: {text[:len(done)][-80:]!r}). Use a template that"
                    " renders a conversation as the concatenation of its turns (e.g. chat_template: chatml), or"
                    " conversations that end at their one assistant turn."
                )
            if len(text) > len(done):
                pieces.append((text[len(done):], assistant))
            done = text

        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                extend(self._render(messages[:i], add_generation_prompt=True) if i else "", False)
                extend(self._render(messages[: i + 1], add_generation_prompt=False), True)
        extend(self._render(messages, add_generation_prompt=add_generation_prompt), False)
        return pieces

    def _tokenize_pieces(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        if not pieces:
            return [], []
        encoded = self.tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        labels: list[int] = []
        for piece_ids, (_, assistant) in zip(encoded, pieces):
            ids += piece_ids
            labels += piece_ids if assistant else [-100] * len(piece_ids)
        return ids, labels

    # -- both ------------------------------------------------------------------------------------

    def encode(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a training example (untruncated); labels are -100 where there is no loss."""
        if self.is_chat(row):
            messages = self._messages(row)
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError("A conversation has no assistant message, so nothing to learn in it.")
            return self._tokenize_pieces(self._chat_pieces(messages, add_generation_prompt=False))
        output = row[self.output_column]
        if not isinstance(output, str):
            raise ValueError(f"the {self.output_column!r} field is {output!r}, not a string: give every example a response text.")
        prompt, output = self.tokenizer([self.prompt_text(row), output], add_special_tokens=False)["input_ids"]
        head = self._bos() + prompt
        return head + output + self._eos(), [-100] * len(head) + output + self._eos()

    def encode_prompt(self, row: dict[str, Any] | str) -> list[int]:
        """The token ids a model is given to generate the response of ``row``, as training saw them.

        ``row`` is an instruction row (its ``output`` ignored), a chat row (a final assistant message is dropped:
        it is the reference answer) or a plain string, which is an instruction for instruction formatting.
        """
        if isinstance(row, str):
            row = {self.instruction_column: row}
        if self.is_chat(row):
            messages = self._messages(row)
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            return self._tokenize_pieces(self._chat_pieces(messages, add_generation_prompt=True))[0]
        return self._bos() + self.tokenizer(self.prompt_text(row), add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Packing


def pack_examples(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most ``max_length`` tokens, best-fit decreasing (no example is split).

    Each row holds ``input_ids``, ``labels`` (the first label of every example set to -100) and ``position_ids``
    (restarting at 0 for every example). Deterministic: ties keep the input order.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"An example of {n} tokens does not fit in a packed row of max_length={max_length}.")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
        else:
            room, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(free, (room - n, r))
    packed = []
    for members in rows:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for i in sorted(members):
            e = examples[i]
            row["input_ids"] += e["input_ids"]
            row["labels"] += [-100] + e["labels"][1:]
            row["position_ids"] += list(range(len(e["input_ids"])))
        packed.append(row)
    return packed


class _PackedCollator:
    """Right-pad packed rows; padding continues as its own run of positions (so it attends only to itself)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids, labels, positions = [], [], []
        for r in rows:
            pad = longest - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_token_id] * pad)
            labels.append(r["labels"] + [-100] * pad)
            positions.append(r["position_ids"] + list(range(pad)))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
        }


class _LeftPadCollator:
    """Prompts for generation: left-padded, with the example's index."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        pads = [longest - len(r["input_ids"]) for r in rows]
        return {
            "input_ids": torch.tensor([[self.pad_token_id] * p + r["input_ids"] for p, r in zip(pads, rows)], dtype=torch.long),
            "attention_mask": torch.tensor([[0] * p + [1] * len(r["input_ids"]) for p, r in zip(pads, rows)], dtype=torch.long),
            "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
        }


# ----------------------------------------------------------------------------------------------
# The DataModule


class InstructionData(L.LightningDataModule):
    """Instruction or chat fine-tuning data from a JSON list or JSONL file.

    Instruction rows (``instruction`` / optional ``input`` / ``output``) use the Alpaca template unless
    ``prompt_template`` is given; chat rows (``messages``) use the chat template. A file is one or the other (its
    first row decides). The loss covers only the responses (instruction: the output and eos; chat: the assistant
    turns). Examples are truncated to ``max_length``; those left with no response token are dropped (with a warning).
    Batches are right-padded to their longest example, or, with ``packing=True``, training examples are packed into
    rows of ``max_length`` tokens without attention between them (see :mod:`lightning_peft.tasks.instruction`).

    Args:
        train_file: JSON (a list of objects) or JSONL file of examples.
        val_file: Validation file; None splits ``val_fraction`` of ``train_file`` off instead.
        predict_file: Prompts for ``Trainer.predict`` (instruction rows, chat rows; an ``output`` or final
            assistant message is ignored).
        instruction_column: Field with the instruction.
        input_column: Field with the optional input (context); a missing or blank field selects the
            template without input.
        output_column: Field with the response to learn.
        messages_column: Field with a chat conversation (a list of ``{"role", "content"}`` objects).
        prompt_template: Instruction prompt with ``{instruction}`` and optionally ``{input}``, e.g.
            ``"Question: {instruction}\\nAnswer: "``; None uses the Alpaca templates.
        chat_template: Chat rows: None uses the tokenizer's template; ``"chatml"``; a Jinja template; a .jinja file.
        packing: Pack training examples into full rows (validation stays unpacked).
        max_length: Examples (and packed rows) are at most this many tokens.
        batch_size: Training batch size (rows, when packing).
        eval_batch_size: Validation and predict batch size; None uses ``batch_size``.
        num_workers: DataLoader worker processes.
        val_fraction: Fraction of ``train_file`` held out for validation when ``val_file`` is None
            (at least one example); 0 disables validation.
        max_rows: Use a random subset of this many rows of ``train_file`` (drawn with ``seed``,
            before the validation split); None uses all.
        seed: Seed of the subset, the validation split and the per-epoch shuffle.
        tokenizer_name_or_path: Tokenizer directory; None uses the LightningModule's ``tokenizer``.
        group_by_length: Put training examples of similar lengths in the same batches (as ``TextClassificationData``'s
            ``group_by_length``); packed rows are full already, so not with ``packing``.
    """

    def __init__(
        self,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        predict_file: Optional[str] = None,
        instruction_column: str = "instruction",
        input_column: str = "input",
        output_column: str = "output",
        messages_column: str = "messages",
        prompt_template: Optional[str] = None,
        chat_template: Optional[str] = None,
        packing: bool = False,
        max_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        max_rows: Optional[int] = None,
        seed: int = 0,
        tokenizer_name_or_path: Optional[str] = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_value(owner, "group_by_length", group_by_length, bool)
        if group_by_length and packing:
            raise ValueError(
                f"{owner}: group_by_length=True with packing=True: packed rows are full already (max_length tokens each)."
                " Use one of the two: packing for the least padding, group_by_length to keep one example per row."
            )
        for name, value, tp in (
            ("max_length", max_length, int), ("batch_size", batch_size, int), ("eval_batch_size", eval_batch_size, Optional[int]),
            ("num_workers", num_workers, int), ("val_fraction", val_fraction, float), ("max_rows", max_rows, Optional[int]),
            ("seed", seed, int),  # random.Random("0") would silently draw another order than 0
        ):
            check_value(owner, name, value, tp)
        _check_loader_args(owner, batch_size, eval_batch_size, num_workers, max_length)
        if not isinstance(packing, bool):
            raise ValueError(f"{owner}: packing must be true or false, got {packing!r}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"{owner}: val_fraction must be in [0, 1), got {val_fraction}.")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"{owner}: max_rows must be >= 1 or None (all rows), got {max_rows}.")
        if prompt_template is not None:
            _check_prompt_template(prompt_template)
        _resolve_chat_template(chat_template)  # a bad value is refused now, not at setup
        self.save_hyperparameters(ignore=["tokenizer_name_or_path"] if tokenizer_name_or_path is None else [])  # as in TextClassificationData
        self.tokenizer = load_tokenizer(tokenizer_name_or_path) if tokenizer_name_or_path else None
        self.datasets: dict[str, _ListDataset] = {}
        self.predict_rows: list[dict[str, Any]] = []
        self.chat: Optional[bool] = None  # whether the data read is chat rows (known after setup)

    def generation_stop(self) -> list[list[int]]:
        """Token sequences that end a response besides eos, for generating from this data (``CausalLM.predict_step``,
        ``val_generations``): a chat template's turn end (ChatML: ``<|im_end|>``), which training taught."""
        if not self.chat:
            return []
        end = self.formatter().turn_end()
        return [end] if end else []

    def formatter(self, tokenizer: Any = None) -> PromptFormatter:
        """The formatter of these settings (the generation commands build prompts with it)."""
        hp = self.hparams
        return PromptFormatter(
            tokenizer if tokenizer is not None else self.tokenizer, hp.prompt_template, hp.chat_template,
            hp.instruction_column, hp.input_column, hp.output_column, hp.messages_column,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        hp = self.hparams
        self.tokenizer = _resolve_tokenizer(self, self.tokenizer)
        ensure_pad_token(self.tokenizer)
        if stage == "predict":
            if hp.predict_file is None:
                raise ValueError("InstructionData: Trainer.predict() needs predict_file=<a .json/.jsonl file of prompts>.")
            self._setup_predict()
            return
        if "train" in self.datasets:
            return
        if hp.train_file is None:
            raise ValueError(f"InstructionData: Trainer.{stage or 'fit'}() needs train_file=<a .json/.jsonl file>.")
        rows = self._read(hp.train_file)
        self.chat = self.formatter().is_chat(rows[0])
        order = list(range(len(rows)))
        random.Random(hp.seed).shuffle(order)
        if hp.max_rows is not None:
            order = order[: hp.max_rows]
        if hp.val_file is not None:
            val_rows, train_idx = self._read(hp.val_file), order
        else:
            n_val = max(1, round(len(order) * hp.val_fraction)) if hp.val_fraction > 0 and len(order) > 1 else 0
            val_rows, train_idx = [rows[i] for i in order[:n_val]], order[n_val:]
        train = self._tokenize([rows[i] for i in train_idx], hp.train_file)
        self.datasets["train"] = _ListDataset(pack_examples(train, hp.max_length) if hp.packing else train)
        if val_rows:
            self.datasets["val"] = _ListDataset(self._tokenize(val_rows, hp.val_file or hp.train_file))

    def _setup_predict(self) -> None:
        hp = self.hparams
        self.predict_rows = self._read(hp.predict_file, need_output=False)
        fmt = self.formatter()
        self.chat = fmt.is_chat(self.predict_rows[0])
        examples = []
        for i, row in enumerate(self.predict_rows):
            try:
                ids = fmt.encode_prompt(row)
            except ValueError as err:
                raise ValueError(f"{hp.predict_file!r} example {i + 1}: {err}") from None
            if len(ids) > hp.max_length:
                raise ValueError(
                    f"{hp.predict_file!r} example {i + 1}: its prompt is {len(ids)} tokens, more than max_length="
                    f"{hp.max_length}. Raise max_length (prompts are not truncated: a cut prompt is another prompt)."
                )
            examples.append({"input_ids": ids, "index": i})
        self.datasets["predict"] = _ListDataset(examples)

    def _read(self, file: str, need_output: bool = True) -> list[dict[str, Any]]:
        hp = self.hparams
        rows = read_table(file)
        if not rows:
            raise ValueError(f"{file!r} has no examples.")
        chat = hp.messages_column in rows[0]
        required = [hp.messages_column] if chat else [hp.instruction_column] + ([hp.output_column] if need_output else [])
        for i, row in enumerate(rows, start=1):
            missing = [c for c in required if c not in row]
            if missing:
                kind = "chat (its first example has" if chat else "instruction (its first example has no"
                raise ValueError(
                    f"{file!r} example {i} lacks the field(s) {missing}. Fields found: {list(row)}; the file is read as"
                    f" {kind} {hp.messages_column!r}); expected: {required}"
                    + ("" if chat else f" (+ optional {hp.input_column!r})")
                    + ". Set instruction_column / output_column / input_column / messages_column to the file's field names."
                )
        return rows

    def _tokenize(self, rows: list[dict[str, Any]], file: str) -> list[dict[str, list[int]]]:
        hp = self.hparams
        fmt = self.formatter()
        if not fmt._eos() and not fmt.is_chat(rows[0]):
            rank_zero_warn("The tokenizer has no eos or sep token: examples end without an end-of-sequence token.")
        examples, dropped = [], 0
        for i, row in enumerate(rows, start=1):
            try:
                ids, labels = fmt.encode(row)
            except ValueError as err:
                raise ValueError(f"{file!r} example {i}: {err}") from None
            ids, labels = ids[: hp.max_length], labels[: hp.max_length]
            if all(label == -100 for label in labels):
                dropped += 1
                continue
            examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        if not examples:
            raise ValueError(
                f"No example from {file!r} fits in max_length={hp.max_length} tokens with its response."
                " Raise max_length."
            )
        if dropped:
            rank_zero_warn(
                f"{dropped} of {len(rows)} examples from {file!r} have no response token left after truncating to"
                f" max_length={hp.max_length} and were dropped. Raise max_length to keep them."
            )
        return examples

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        collate = _PackedCollator(self.tokenizer.pad_token_id) if hp.packing else self._collate()
        return _loader(self.datasets["train"], hp.batch_size, True, hp.seed, hp.num_workers, collate, _trained_batches(self),
                       grouped=hp.group_by_length)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets:
            return []  # val_fraction=0 and no val_file: Lightning then skips validation
        hp = self.hparams
        size = hp.eval_batch_size or hp.batch_size
        return _loader(self.datasets["val"], size, False, hp.seed, hp.num_workers, self._collate())

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        size = hp.eval_batch_size or hp.batch_size
        return _loader(self.datasets["predict"], size, False, hp.seed, hp.num_workers, _LeftPadCollator(self.tokenizer.pad_token_id))

    def _collate(self) -> _PadCollator:
        return _PadCollator(self.tokenizer.pad_token_id)
