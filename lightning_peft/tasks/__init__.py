"""Ready LightningModules and DataModules for the CLI: sequence classification (one task or several) and causal LM."""

from lightning_peft.tasks._hf import load_tokenizer, resolve_model_path
from lightning_peft.tasks.causal_lm import CausalLM
from lightning_peft.tasks.classification import SequenceClassifier
from lightning_peft.tasks.data import ResumableLoader, TextClassificationData, read_table
from lightning_peft.tasks.instruction import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    CHATML_TEMPLATE,
    InstructionData,
    PromptFormatter,
    alpaca_prompt,
    pack_examples,
)
from lightning_peft.tasks.multitask import MultiTaskBatches, MultiTaskClassifier, MultiTaskData
from lightning_peft.tasks.writer import PredictionWriter

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHATML_TEMPLATE",
    "CausalLM",
    "InstructionData",
    "MultiTaskBatches",
    "MultiTaskClassifier",
    "MultiTaskData",
    "PredictionWriter",
    "PromptFormatter",
    "ResumableLoader",
    "SequenceClassifier",
    "TextClassificationData",
    "alpaca_prompt",
    "pack_examples",
    "load_tokenizer",
    "read_table",
    "resolve_model_path",
]
