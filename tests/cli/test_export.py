"""`lightning-peft export`: a checkpoint of a CLI run to PEFT's format (loaded by peft) or to a merged HF model."""

from pathlib import Path

import pytest
import torch

from lightning_peft.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_train_export_load_with_peft_and_merge(tmp_path, minilm_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from lightning_peft import load_adapter_checkpoint
    from lightning_peft.tasks import SequenceClassifier

    main([
        "fit", "--config", "configs/quickstart.yaml", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_checkpointing=true", "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--data.init_args.max_train_rows=48",
        f"--trainer.callbacks.init_args.save_dir={tmp_path / 'fit_adapter'}",
    ])
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "adapter")])
    assert "adapter written to" in capsys.readouterr().out

    ours = load_adapter_checkpoint(SequenceClassifier(model_name_or_path="all-MiniLM-L6-v2", num_labels=2), ckpt).eval()
    batch = ours.tokenizer(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    expected = ours.model(**batch).logits
    torch.manual_seed(1)  # the head's init must not matter: its trained weights are in the adapter
    theirs = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2), tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(**batch).logits, expected, atol=1e-5, rtol=0)
    # the task modules are PEFTMixin modules: Lightning's own loader injects the recorded adapter and loads it
    loaded = SequenceClassifier.load_from_checkpoint(ckpt).eval()
    torch.testing.assert_close(loaded.model(**batch).logits, expected, atol=0, rtol=0)

    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "merged"), "--merged=true"])
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_export_without_a_config_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "deep" / "er" / "x.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({}, ckpt)
    with pytest.raises(FileNotFoundError, match="No config.yaml found beside .* Pass the run's config with --config"):
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "o")])


def test_a_random_base_from_config_is_rebuilt_from_the_run_seed(tmp_path, shared_data):
    """A CausalLM built with from_config=True has random base weights: export rebuilds them from the run's
    seed_everything, so the merged model equals the trained one (and two exports are the same); without an integer
    seed the export is refused instead of writing other weights."""
    import yaml
    from transformers import AutoModelForCausalLM

    from lightning_peft import merge_adapters
    from lightning_peft.cli import PEFTCLI

    args = [
        "fit", "--config", "configs/lora_causal_lm.yaml", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=true",
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", f"--data.init_args.train_file={shared_data / 'instructions' / 'alpaca_data_1k_sample.json'}",
        "--data.init_args.max_rows=16", "--data.init_args.batch_size=4", f"--trainer.callbacks.init_args.save_dir={tmp_path / 'fit_adapter'}",
    ]
    import lightning_peft.tasks  # noqa: F401

    cli = PEFTCLI(lightning_peft.tasks.CausalLM, lightning_peft.tasks.InstructionData, subclass_mode_model=True, subclass_mode_data=True,
                  save_config_kwargs={"overwrite": True}, args=args)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    trained = cli.model.eval()
    merge_adapters(trained)
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    expected = trained.model(input_ids=ids).logits
    for out in ("merged", "again"):
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / out), "--merged=true"])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", local_files_only=True).eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), again.state_dict().values()))

    config = tmp_path / "lightning_logs" / "version_0" / "config.yaml"
    if not config.is_file():
        config = next(tmp_path.rglob("config.yaml"))
    unseeded = yaml.safe_load(config.read_text())
    unseeded["seed_everything"] = None
    (tmp_path / "unseeded.yaml").write_text(yaml.safe_dump(unseeded))
    with pytest.raises(ValueError, match="from_config=True .* no integer seed_everything"):
        main(["export", "--ckpt_path", str(ckpt), "--config", str(tmp_path / "unseeded.yaml"), "--out", str(tmp_path / "x"), "--merged=true"])
    assert not (tmp_path / "x").exists()


def test_a_multitask_run_exports_every_adapter_or_one_with_its_own_head(tmp_path, shared_data, minilm_path):
    """configs/multitask.yaml trains three adapters, each with a head; export writes them in peft's layout, --adapter
    picks one (written alone, or merged with its head), and --merged without it says to pick one."""
    from transformers import AutoModelForSequenceClassification

    from lightning_peft import load_adapter_checkpoint, set_active_adapters
    from lightning_peft.tasks import MultiTaskClassifier

    main([
        "fit", "--config", "configs/multitask.yaml", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_checkpointing=true", "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", f"--data.init_args.data_dir={shared_data / 'glue'}",
        f"--trainer.callbacks.init_args.save_dir={tmp_path / 'fit_adapter'}",
    ])
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "all")])
    assert sorted(p.parent.name for p in (tmp_path / "all").rglob("adapter_config.json")) == ["cola", "mrpc", "sst2"]
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "mrpc"), "--adapter", "mrpc"])
    assert (tmp_path / "mrpc" / "adapter_config.json").is_file() and not (tmp_path / "mrpc" / "sst2").exists()
    with pytest.raises(ValueError, match=r"pass --adapter NAME to merge one of the checkpoint's adapters \['sst2', 'mrpc', 'cola'\]"):
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "merged_all"), "--merged=true"])
    assert not (tmp_path / "merged_all").exists()
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "merged"), "--merged=true", "--adapter", "mrpc"])

    ours = load_adapter_checkpoint(MultiTaskClassifier(tasks={"sst2": 2, "mrpc": 2, "cola": 2}), ckpt).eval()
    batch = ours.tokenizer(["The cat sat.", "A cat was sitting."], ["A dog ran.", "The cat sat down."], return_tensors="pt", padding=True)
    set_active_adapters(ours.model, "mrpc")
    expected = ours.model(**batch).logits
    set_active_adapters(ours.model, "sst2")
    assert not torch.allclose(ours.model(**batch).logits, expected)  # the adapters (and heads) differ
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-5)
