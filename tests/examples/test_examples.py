"""Every script in examples/ in its --smoke size on the real GLUE data, with a check of what it claims."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def _example(name: str):
    """Import examples/<name>.py as a module (its folder on sys.path, for examples/_common.py)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(shared_data, minilm_path, tmp_path):
    pytest.importorskip("matplotlib")

    def go(name: str, *extra: str):
        return _example(name).main(["--smoke", "--threads", "1", "--data-dir", str(shared_data), "--out", str(tmp_path), *extra])

    return go


def _acc_ok(value) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0


def test_01_callback_trains_only_adapters_and_head(run):
    res = run("01_lora_callback")
    assert res["changed"] == ["classifier.bias", "classifier.weight"]  # the encoder's weights are untouched
    assert res["checkpoint tensors"] == 2 * res["adapted modules"] + 2  # A and B per layer + the head
    assert all("lora_" in k or "classifier" in k for k in res["checkpoint_keys"])
    assert res["trainable"] < 0.02 * res["of base"] and _acc_ok(res["dev acc"])


def test_02_rank_sweep_has_one_row_per_rank_and_a_chart(run, tmp_path):
    module = _example("02_lora_rank_sweep")
    rows = run("02_lora_rank_sweep")
    ranks = [r for r in rows if r["sweep"] == "rank"]
    assert [r["r"] for r in ranks] == module.RANKS and all(r["alpha"] == 2 * r["r"] for r in ranks)
    assert [r["alpha"] for r in rows if r["sweep"] == "alpha"] == module.ALPHAS_AT_R8
    assert all(_acc_ok(r["dev acc"]) for r in rows)
    assert all(r["LoRA params"] == r["r"] * ranks[0]["LoRA params"] for r in rows)  # r (in + out) per layer
    assert (tmp_path / "rank_sweep.png").read_bytes()[:8] == PNG


def test_07_prompt_tuning_inits_each_train_their_prompt(run, tmp_path):
    rows = run("07_prompt_tuning_inits", "--tokens", "8")
    assert [r["init"] for r in rows] == ["random", "vocab", "text"]
    for r in rows:
        assert r["prompt params"] == 8 * 384 and r["trainable"] == r["prompt params"] + 770  # prompt + head
        assert 0.0 < r["moved (rel.)"] < 10.0 and _acc_ok(r["dev acc"])  # every prompt trained from its own start
    assert len({round(r["start norm / token"], 4) for r in rows}) == 3  # three different starting points
    assert (tmp_path / "prompt_inits.png").read_bytes()[:8] == PNG


def test_03_lora_beats_full_fine_tuning_on_size_and_memory(run, tmp_path):
    lora, full = run("03_lora_vs_full")
    assert lora["method"].startswith("LoRA") and full["method"] == "full fine-tuning"
    assert lora["trainable"] < 0.02 * full["trainable"]
    assert lora["checkpoint MiB"] < 0.05 * full["checkpoint MiB"]
    # full fine-tuning also holds a gradient and two AdamW moments per base weight (~3 x 87 MiB)
    assert 0 < lora["peak RSS MiB"] < full["peak RSS MiB"]
    assert _acc_ok(lora["dev acc"]) and _acc_ok(full["dev acc"]) and lora["wall s"] > 0
    assert (tmp_path / "lora_vs_full.png").read_bytes()[:8] == PNG


def test_04_loaded_adapter_gives_the_trained_models_accuracy_and_logits(run):
    res = run("04_load_adapter")
    trained, fresh, loaded = res["rows"]
    assert loaded["dev acc"] == trained["dev acc"] and loaded["LoRA params"] == trained["LoRA params"] > 0
    assert res["max_logit_diff"] < 1e-5
    assert fresh["LoRA params"] == 0
    assert set(res["files"]) == {"adapter_config.json", "adapter_model.safetensors"}


def test_05_merged_and_reloaded_outputs_equal_the_adapter_models(run):
    res = run("05_merge_and_save")
    assert len(res["rows"]) == 4
    for row in res["rows"]:
        assert row["max abs diff"] < 1e-4 and row["dev acc"] == res["rows"][0]["dev acc"]
    assert res["lora_layers_left"] == 0 and not any("lora" in n for n in res["reloaded_names"])
    assert res["linear_types"] == {torch.nn.Linear}


def test_06_two_adapters_switch_and_mix_in_one_batch(run):
    res = run("06_two_task_adapters")
    assert res["adapters"] == ["sst2", "cola"]
    assert res["sst2_unchanged"]  # training the CoLA adapter left the SST-2 adapter and head alone
    assert [s["adapter"] for s in res["scores"]] == ["sst2", "cola"] and all(_acc_ok(s["dev acc"]) for s in res["scores"])
    names = res["names"]
    assert set(names) == {"sst2", "cola"}
    for i, task in enumerate(names):  # each row of the mixed batch equals its adapter run alone
        torch.testing.assert_close(res["mixed_logits"][i], res["alone_logits"][task][i], atol=1e-5, rtol=1e-5)


def test_08_each_glue_task_is_scored_with_its_metric(run):
    rows = run("08_glue_tasks")
    assert [(r["task"], r["GLUE metric"]) for r in rows] == [
        ("sst2", "accuracy"), ("mrpc", "F1"), ("rte", "accuracy"), ("cola", "Matthews corr.")]
    for r in rows:
        assert math.isfinite(r["score"]) and -1.0 <= r["score"] <= 1.0 and _acc_ok(r["dev acc"]) and r["train rows"] == 64
        if r["GLUE metric"] == "accuracy":
            assert r["score"] == r["dev acc"]


def test_09_qlora_and_adalora_through_the_cli(run):
    pytest.importorskip("bitsandbytes")
    res = run("09_cli_qlora_adalora")
    qlora, adalora = res["rows"]
    assert qlora["peft_type"] == "LORA" and adalora["peft_type"] == "ADALORA"
    assert qlora["lora_B trained"] > 0 and adalora["lora_B trained"] > 0  # B starts at zero: these were trained
    assert len(res["qlora_log"]["train_loss"]) == 4 and all(math.isfinite(v) for v in res["qlora_log"]["train_loss"])
    ranks = res["ranks"]
    assert len(ranks) == 37 and max(ranks.values()) <= 12  # at most init_r each
    # the config's parameter budget: at most rank 8's parameters everywhere, used up to less than one triplet
    assert res["adalora_budget"] - res["adalora_max_cost"] < res["adalora_params"] <= res["adalora_budget"]
    assert res["heatmap"].read_bytes()[:8] == PNG
    assert _acc_ok(adalora["dev acc"])
