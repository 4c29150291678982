"""No file runs code: real malicious pickles (they write a marker file when unpickled) through every loading path.

Paths: an adapter directory (``adapter_model.bin``, refused by default, ``weights_only`` with ``allow_pickle``), a
``.ckpt`` through :func:`load_adapter_checkpoint`, through ``Trainer.fit(ckpt_path=...)`` and through
``lightning-peft export`` (the checkpoint, and a ``config.yaml`` whose ``model.class_path`` is a callable).
"""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_peft import LoRA, load_adapter, load_adapter_checkpoint
from lightning_peft.cli import main
from tests.callbacks.helpers import TinyLM


class _Payload:
    """Unpickling this runs ``exec``, which writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _evil_checkpoint(path: Path, marker: Path, record: bool = True) -> Path:
    ckpt = {"state_dict": {}, "payload": _Payload(marker), "epoch": 0, "global_step": 0}
    if record:
        ckpt["lightning_peft"] = {"methods": [], "trainable": []}
    torch.save(ckpt, path)
    return path


def test_the_payload_does_run_when_unpickled_in_full(tmp_path):
    """The fixture is real: a full unpickle writes the marker (so the tests below would see it)."""
    marker = tmp_path / "marker"
    torch.load(_evil_checkpoint(tmp_path / "x.ckpt", marker), weights_only=False)
    assert marker.read_text() == "ran"


def test_adapter_directory_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2), "p": _Payload(marker)}, d / "adapter_model.bin")
    model = TinyLM().model
    with pytest.raises(ValueError, match="pickle file, which can run arbitrary code"):
        load_adapter(model, d)
    with pytest.raises(ValueError, match="could not be read"):
        load_adapter(model, d, allow_pickle=True)  # weights_only=True: the payload is refused, not run
    assert not marker.exists()


def test_load_adapter_checkpoint_refuses_the_payload_naming_the_type_and_the_opt_in(tmp_path):
    marker = tmp_path / "marker"
    path = _evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match=r"(?s)evil.ckpt holds a type .*exec.*not loaded.*allow_types=\[TheType\]"):
        load_adapter_checkpoint(TinyLM(), path)
    assert not marker.exists()


def test_allow_types_admits_a_trusted_type(tmp_path):
    from lightning_peft.callbacks.base import read_checkpoint

    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {}, "hp": _Trusted(3)}, path)
    with pytest.raises(ValueError, match="_Trusted"):
        read_checkpoint(path)
    assert read_checkpoint(path, allow_types=[_Trusted])["hp"].x == 3


class _Trusted:
    def __init__(self, x: int) -> None:
        self.x = x


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_empty_or_truncated_checkpoints_get_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.ckpt is (empty|not a readable checkpoint)"):
        load_adapter_checkpoint(TinyLM(), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter_checkpoint(TinyLM(), tmp_path / "missing.ckpt")


def test_trainer_fit_from_a_malicious_checkpoint_does_not_run_it(tmp_path):
    marker = tmp_path / "marker"
    path = _evil_checkpoint(tmp_path / "evil.ckpt", marker)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LoRA(r=2, alpha=4, target_modules=["q_proj"])], default_root_dir=tmp_path)
    with pytest.raises(Exception, match="(?i)weights_only|global"):
        trainer.fit(TinyLM(), ckpt_path=path)
    assert not marker.exists()


def test_export_neither_unpickles_the_checkpoint_nor_calls_the_configs_class_path(tmp_path, capsys):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    evil = _evil_checkpoint(run / "checkpoints" / "evil.ckpt", marker)
    with pytest.raises(ValueError, match="holds a type"):
        main(["export", "--ckpt_path", str(evil), "--out", str(tmp_path / "out")])
    assert not marker.exists()

    # a harmless checkpoint, but the run's config.yaml names a callable instead of a LightningModule
    ckpt = run / "checkpoints" / "plain.ckpt"
    torch.save({"state_dict": {}, "lightning_peft": {"methods": [], "trainable": []}}, ckpt)
    (run / "config.yaml").write_text(f"model:\n  class_path: subprocess.run\n  init_args:\n    args: [touch, {marker}]\n")
    with pytest.raises(TypeError, match=r"config.yaml: model.class_path subprocess.run is not a LightningModule subclass .*nothing was called"):
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")])
    assert f"model built from {run / 'config.yaml'}" in capsys.readouterr().out
    assert not marker.exists()


def test_an_empty_checkpoint_is_named_as_empty(tmp_path):
    """A 0-byte file (a write that never finished) says so, rather than a generic unreadable-file error."""
    from lightning_peft.callbacks.base import read_checkpoint

    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.ckpt is empty \(0 bytes\): the write that made it did not finish"):
        read_checkpoint(path)


@pytest.mark.parametrize("content", [[1, 2], torch.zeros(2)], ids=["list", "tensor"])
def test_a_file_that_is_not_a_checkpoint_dict_is_refused(tmp_path, content):
    path = tmp_path / "other.ckpt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=rf"other.ckpt holds a {type(content).__name__}, not a Lightning checkpoint \(a dict\)"):
        load_adapter_checkpoint(TinyLM(), path)


def test_export_does_not_instantiate_a_class_that_is_not_a_lightning_module(tmp_path):
    """A class is callable too: config.yaml naming ``subprocess.Popen`` must not get to run a command."""
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "plain.ckpt"
    torch.save({"state_dict": {}, "lightning_peft": {"methods": [], "trainable": []}}, ckpt)
    (run / "config.yaml").write_text(f"model:\n  class_path: subprocess.Popen\n  init_args:\n    args: [touch, {marker}]\n")
    with pytest.raises(TypeError, match=r"model.class_path subprocess.Popen is not a LightningModule subclass \(type\); nothing was called"):
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")])
    assert not marker.exists()
