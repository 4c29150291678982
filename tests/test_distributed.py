"""``lightning_peft.distributed`` in one process (a world-size-1 gloo group): the FSDP1 gather works unit by unit,
never on the whole model at once."""

import socket

import pytest
import torch
import torch.distributed as dist

import lightning_peft as lp
from lightning_peft.distributed import gather_adapter
from tests.conftest import tiny_llama


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp1_gather_takes_one_wrapped_unit_at_a_time_and_skips_units_without_adapter(process_group, monkeypatch):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = tiny_llama(seed=0)
    lp.LoRA(r=4, target_modules=["q_proj", "v_proj"]).inject(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_()
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=torch.device("cpu"), use_orig_params=True)

    calls, own = [], FSDP.summon_full_params

    def spy(module, *args, **kwargs):
        calls.append((type(module._fsdp_wrapped_module).__name__, kwargs.get("recurse", True)))
        return own(module, *args, **kwargs)

    monkeypatch.setattr(FSDP, "summon_full_params", staticmethod(spy))
    got = gather_adapter(model, root=wrapped)
    assert calls == [("LlamaDecoderLayer", False), ("LlamaDecoderLayer", False)]  # not the root (embeddings, head)
    assert got.keys() == expected.keys() and len(got) == 8  # keyed as in the unwrapped model
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
