"""Ready LightningModules and DataModules for the CLI: sequence classification and causal LM."""

from lightning_peft.tasks._hf import load_tokenizer, resolve_model_path
from lightning_peft.tasks.causal_lm import CausalLM
from lightning_peft.tasks.classification import SequenceClassifier
from lightning_peft.tasks.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    InstructionData,
    ResumableLoader,
    TextClassificationData,
    alpaca_prompt,
    read_table,
)

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CausalLM",
    "InstructionData",
    "ResumableLoader",
    "SequenceClassifier",
    "TextClassificationData",
    "alpaca_prompt",
    "load_tokenizer",
    "read_table",
    "resolve_model_path",
]
