"""One spelling of each method's name: the bench's method keys are the callbacks' ``method_name``."""

import pytest

import lightning_peft.callbacks  # noqa: F401  (defines, so registers, every callback)
from lightning_peft.bench import inference, quality, speed
from lightning_peft.bench.common import METHOD_ALIASES, method_names
from lightning_peft.callbacks.base import PEFTCallback

NOT_A_CALLBACK = {
    "full": "full fine-tuning", "qlora": "LoRA on a 4-bit base (the QLoRAPrecision plugin)", "dora": "LoRA(use_dora=True), a variant of the LoRA callback",
    "pissa": "LoRA(init='pissa'), a variant of the LoRA callback",
}


@pytest.mark.parametrize("table", [speed.METHODS, quality.METHODS, dict.fromkeys(inference.METHOD_NAMES[1:])], ids=["speed", "quality", "inference"])
def test_every_bench_method_is_named_as_its_callback(table):
    names = set(PEFTCallback._registry)
    assert {m for m in table if m not in NOT_A_CALLBACK} <= names, sorted(set(table) - names - set(NOT_A_CALLBACK))


def test_earlier_spellings_are_accepted_and_mean_the_callbacks_name():
    assert method_names(["lora", "parallel", "mam"]) == ["lora", "parallel_adapter", "mam_adapter"]
    assert set(METHOD_ALIASES.values()) <= set(PEFTCallback._registry)
    assert not set(METHOD_ALIASES) & (set(speed.METHODS) | set(quality.METHODS))
    with pytest.raises(ValueError, match="Unknown method.*'parallel_adapter'"):
        quality.run(task="sst2", methods=["parallel", "nope"], seeds=1)
