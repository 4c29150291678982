import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_peft.callbacks.unipelt import UniPELT
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel
from tests.callbacks.method_checks import check_checkpoint_and_resume, check_fit


def _is_adapter(name):
    leaf = name.split(".")
    return ".prefix_tuning.prefix_" in name or any(p.startswith(("lora_", "houlsby_")) for p in leaf)


def _small():
    return UniPELT(num_virtual_tokens=4, prefix_hidden_size=16, bottleneck_size=8)


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel])
def test_fit_trains_the_three_gated_parts_only(tmp_path, module_cls):
    module, cb = check_fit(tmp_path, _small, _is_adapter, module_cls=module_cls)
    assert sorted(n.rsplit(".", 1)[-1] for n in cb.injected) == sorted(["q_proj", "v_proj"] * 2 + ["prefix_tuning"] + ["down_proj"] * 2)
    gates = [n for n, p in module.named_parameters() if "_gate." in n and p.requires_grad]
    assert len(gates) == 2 * (2 * 2 + 2 + 2)  # weight + bias of q, v, prefix and adapter gates, 2 layers


def test_checkpoint_holds_the_adapter_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, _small, _is_adapter)
    assert sum("_gate." in k for k in ckpt["state_dict"]) == 16
    (record,) = ckpt["lightning_peft"]["methods"]
    assert record["method"] == "unipelt" and record["lora_target_modules"] == ["query", "value", "q_proj", "v_proj"]


def test_gate_means_are_logged_per_layer_to_the_csv_logger(tmp_path):
    L.seed_everything(0)
    module = TinyLM()
    logger = CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=4, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[_small()],
    )
    trainer.fit(module)
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    kinds = ("lora_q_proj", "lora_v_proj", "prefix_key", "prefix_value", "adapter")
    columns = [f"unipelt_gate/layer{i}/{k}" for i in range(2) for k in kinds]
    assert set(columns) <= set(rows[0])
    logged = [r for r in rows if r[columns[0]]]
    assert len(logged) == 4
    values = torch.tensor([[float(r[c]) for c in columns] for r in logged])
    assert ((values > 0) & (values < 1)).all()
    assert not torch.equal(values[0], values[-1])  # the gates train


def test_no_gate_logging_when_switched_off(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=2, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[UniPELT(num_virtual_tokens=2, bottleneck_size=4, log_gates=False)],
    )
    trainer.fit(TinyLM())
    with open(logger.log_dir + "/metrics.csv") as f:
        header = f.readline()
    assert "unipelt_gate" not in header and "train_loss" in header
