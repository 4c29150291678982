import json

import pytest
import torch

from lightning_peft import LlamaAdapter, count_parameters, disable_adapters, load_adapter, save_adapter, unload
from lightning_peft.io import AdapterFileError
from lightning_peft.methods.llama_adapter import LlamaAdapterAttention, find_llama_attention, from_peft, inject_llama_adapter, to_peft
from tests.conftest import REPO, tiny_llama
from tests.methods.sst2_helpers import tiny_decoder

FAMILIES = ("llama", "qwen2")  # both grouped-query: 4 query heads share 2 key/value heads


def _gates(model, value=None, seed=3):
    """Set every gate (to ``value``, or random in [0.5, 1.5]) so the prompts act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LlamaAdapterAttention):
                m.adaption_gate.fill_(value if value is not None else 0.5 + torch.rand(1, generator=g).item())
    return model


def _ids(b=2, t=9, seed=0):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_grads_and_typed_counts(family):
    model = tiny_decoder(family)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = _ids()
    before = model(ids).logits
    cb = LlamaAdapter()  # defaults: 10 prompt tokens in every layer; freezes the base
    cb.inject(model)
    names = cb.injected
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # exactly the base model
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{n}.{t}" for n in names for t in ("adaption_prompt", "adaption_gate")}
    # the gate starts at 0: only it gets a gradient at step 0, the prompt's is exactly zero
    attn = model.model.layers[1].self_attn
    assert attn.adaption_gate.grad.abs().item() > 0 and not attn.adaption_prompt.grad.any()
    counts = count_parameters(model)
    hidden = model.config.hidden_size
    assert counts.added == counts.trainable == 2 * (10 * hidden + 1)
    assert counts.changed == 0 and counts.adapter_bytes == 4 * counts.added
    assert counts.base_total == sum(p.numel() for p in tiny_decoder(family).parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())  # base names unchanged


def _reference(attn: LlamaAdapterAttention, x, cos, sin, base_out):
    """The paper's formula written out per head (float64), independent of the module's code."""
    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    W = lambda lin: lin.weight.double()  # noqa: E731
    b = lambda lin: lin.bias.double() if lin.bias is not None else 0.0  # noqa: E731
    P = attn.adaption_prompt[0].double()  # (L, C)
    Kp, Vp = P @ W(attn.k_proj).T + b(attn.k_proj), P @ W(attn.v_proj).T + b(attn.v_proj)  # (L, Hkv*hd)
    q = x @ W(attn.q_proj).T + b(attn.q_proj)  # (B, T, H*hd)
    heads = []
    for h in range(H):
        qh = q[..., h * hd:(h + 1) * hd]
        qh = qh * cos + torch.cat([-qh[..., hd // 2:], qh[..., : hd // 2]], -1) * sin  # RoPE on the query only
        j = h // (H // Hkv)
        kh, vh = Kp[:, j * hd:(j + 1) * hd], Vp[:, j * hd:(j + 1) * hd]
        heads.append(attn.adaption_gate.double() * torch.softmax(qh @ kh.T / hd**0.5, -1) @ vh)
    return base_out + torch.cat(heads, -1) @ W(attn.o_proj).T


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_matches_the_formula_in_float64(family):
    model = tiny_decoder(family).double()
    inject_llama_adapter(model, adapter_len=5, adapter_layers=1)
    _gates(model)
    attn = model.model.layers[1].self_attn
    seen = {}
    attn.register_forward_hook(lambda mod, args, kwargs, out: seen.update(kwargs=kwargs, out=out[0]), with_kwargs=True)
    model(_ids(), use_cache=False)
    kwargs, out = seen["kwargs"], seen["out"]
    x, (cos, sin) = kwargs["hidden_states"], kwargs["position_embeddings"]
    with disable_adapters(model):
        base_out = attn(**kwargs)[0]
    torch.testing.assert_close(out, _reference(attn, x, cos, sin, base_out))
    assert not torch.allclose(out, base_out)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck_float64(family):
    """Autograd against finite differences for the prompt and the gate, on one adapted attention layer (a whole HF
    Llama, or the gradient through the base attention, cannot be checked this way: its RMSNorm and its eager
    softmax compute in float32 even in a float64 model)."""
    from torch.func import functional_call

    model = tiny_decoder(family).double()
    inject_llama_adapter(model, adapter_len=2, adapter_layers=1)
    _gates(model)
    attn = model.model.layers[1].self_attn
    x = torch.randn(2, 4, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cos, sin = model.model.rotary_emb(x, torch.arange(4)[None])

    def f(prompt, gate):
        kwargs = {"hidden_states": x, "position_embeddings": (cos, sin), "attention_mask": None}
        return functional_call(attn, {"adaption_prompt": prompt, "adaption_gate": gate}, (), kwargs)[0]

    inputs = (attn.adaption_prompt.detach().clone(), attn.adaption_gate.detach().clone())
    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in inputs))


def test_top_layers_only_and_disable_and_unload():
    model = tiny_llama(seed=0, layers=3)
    ids = _ids()
    base = model(ids).logits
    names = inject_llama_adapter(model, adapter_len=4, adapter_layers=2)
    assert names == ["model.layers.1.self_attn", "model.layers.2.self_attn"]
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"
    _gates(model)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)
    # the wrapper forwards the attention's attributes and its train/eval flag
    attn = model.model.layers[2].self_attn
    assert attn.layer_idx == 2 and attn.is_causal
    model.train()
    assert attn._base.training
    model.eval()
    assert not attn._base.training
    unload(model)
    assert all(type(layer.self_attn).__name__ == "LlamaAttention" for layer in model.model.layers)
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)


def test_output_attentions_is_refused_not_silently_short():
    model = tiny_llama(seed=0)
    inject_llama_adapter(model, adapter_len=3, adapter_layers=1)
    with pytest.raises(NotImplementedError, match=r"output_attentions=True is not supported .*LlamaAttention"):
        model(_ids(), output_attentions=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(family, side):
    model = tiny_decoder(family)
    inject_llama_adapter(model, adapter_len=3)
    _gates(model)
    lengths = [9, 5, 7]
    rows = [_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    # positions count from each sample's first real token (what generate() passes); the prompt keys carry none
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    for i, r in enumerate(rows):
        alone = model(input_ids=r[None]).logits[0]
        got = batched[i, mask[i].bool()]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_a_manual_greedy_loop(family):
    model = tiny_decoder(family)
    inject_llama_adapter(model, adapter_len=4)
    _gates(model, value=2.0)
    model.generation_config.eos_token_id = None  # always produce max_new_tokens
    model.generation_config.pad_token_id = 0
    prompt = _ids(1, 6, seed=5)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):  # no cache: every step recomputes the whole sequence
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], -1)
    assert torch.equal(out, seq)
    with disable_adapters(model):
        plain = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert not torch.equal(plain, out)  # the adapter changes what is generated


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padded_batch_generates_what_each_sample_generates_alone(impl):
    model = tiny_decoder("llama")
    model.config._attn_implementation = impl
    inject_llama_adapter(model, adapter_len=4)
    _gates(model, value=2.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    rows = [_ids(1, 7, seed=1)[0], _ids(1, 4, seed=2)[0]]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 7 - len(r):], mask[i, 7 - len(r):] = r, 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for i, r in enumerate(rows):
        alone = model.generate(input_ids=r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), max_new_tokens=6, do_sample=False)
        assert torch.equal(out[i, 7:], alone[0, len(r):])


def test_learning_on_alpaca(minilm_path, shared_data):
    """Loss goes down on a real instruction batch (Alpaca sample, MiniLM tokenizer) with only prompts and gates
    training, on the tiny Llama of configs/tiny_llama (initialized with a larger scale, as tests/conftest.py does,
    so that a random model's attention matters to its output)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_peft.tasks import InstructionData

    dm = InstructionData(
        train_file=str(shared_data / "instructions" / "alpaca_data_1k_sample.json"), max_rows=8, val_fraction=0.0,
        batch_size=8, max_length=64, tokenizer_name_or_path=str(minilm_path),
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    cfg = LlamaConfig.from_pretrained(REPO / "configs" / "tiny_llama")
    cfg._attn_implementation, cfg.initializer_range = "eager", 0.2
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    LlamaAdapter().inject(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


# -- Hugging Face PEFT (adaption prompt) as the oracle -------------------------------------------------
def _tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, initializer_range=0.2)
    cfg._attn_implementation = "eager"
    return MistralForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_ours_loads_in_hf_peft_with_equal_logits(tmp_path, family):
    peft = pytest.importorskip("peft")
    make = (lambda: tiny_llama(seed=0)) if family == "llama" else _tiny_mistral
    ours = make()
    LlamaAdapter(adapter_len=5, adapter_layers=1).inject(ours)
    _gates(ours)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["target_modules"], config["adapter_len"], config["adapter_layers"]) == ("ADAPTION_PROMPT", "self_attn", 5, 1)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    ids = _ids()
    torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(ours(ids).logits, make()(ids).logits, atol=1e-3)


def test_qwen2_round_trip_through_our_files(tmp_path):
    """peft 0.21 has no adaption prompt for Qwen2 (it refuses model_type 'qwen2'); our own files round-trip."""
    ours = tiny_decoder("qwen2")
    LlamaAdapter(adapter_len=3).inject(ours)
    _gates(ours)
    save_adapter(ours, tmp_path)
    loaded = load_adapter(tiny_decoder("qwen2"), tmp_path)
    ids = _ids()
    torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_what_hf_peft_saved_loads_here_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama(seed=0), peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if n.endswith("adaption_gate"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    theirs.save_pretrained(tmp_path)
    theirs.eval()
    ours = load_adapter(tiny_llama(seed=0), tmp_path)
    assert sum(isinstance(m, LlamaAdapterAttention) for m in ours.modules()) == 2
    ids = _ids()
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_bad_file_is_refused_before_the_model_changes(tmp_path):
    src = tiny_llama(seed=0)
    inject_llama_adapter(src, adapter_len=3)
    config, tensors = to_peft(src)
    other = tiny_llama(seed=0)
    bad = dict(tensors)
    bad["base_model.model.model.layers.0.self_attn.adaption_prompt"] = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.adaption_prompt: file shape \[1, 4, 32\], model \[1, 3, 32\]"):
        from_peft(other, {"peft_type": "ADAPTION_PROMPT", **config}, bad)
    with pytest.raises(ValueError, match=r"adapter_layers=3 is more than the 2 modules named \*\.self_attn"):
        from_peft(other, {**config, "adapter_layers": 3}, tensors)
    assert not any(isinstance(m, LlamaAdapterAttention) for m in other.modules())
    save_adapter(src, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "adapter_len": "3"}))
    with pytest.raises(AdapterFileError, match=r"field 'adapter_len' must be int, found str"):
        load_adapter(other, tmp_path)


def test_export_refuses_layers_peft_cannot_name():
    model = tiny_llama(seed=0)
    inject_llama_adapter(model, adapter_len=3)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LlamaAdapterAttention)][:1]  # the bottom one only
    with pytest.raises(NotImplementedError, match=r"last adapter_layers modules named \*\.self_attn"):
        to_peft(model, layers)


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"adapter_len": 0}, r"adapter_len must be an integer >= 1 .*got 0"),
        ({"adapter_len": 2.5}, r"adapter_len must be an integer >= 1 .*got 2\.5"),
        ({"adapter_layers": 0}, r"adapter_layers must be an integer >= 1 .* or None for all, got 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaAdapter(**kwargs)
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match=match):
        inject_llama_adapter(model, **kwargs)


def test_more_layers_than_the_model_has_and_model_unchanged():
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match=r"adapter_layers=3 is more than the 2 attention layers of LlamaForCausalLM: use at most 2, or None for all"):
        LlamaAdapter(adapter_layers=3).inject(model)
    assert not any(isinstance(m, LlamaAdapterAttention) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_twice_is_refused():
    model = tiny_llama(seed=0)
    inject_llama_adapter(model)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM already carries LLaMA-Adapter prompts \(at model\.layers\.0\.self_attn\)"):
        inject_llama_adapter(model)


def test_gpt2_is_refused_naming_class_and_missing_projections():
    model = tiny_decoder("gpt2")
    with pytest.raises(ValueError, match=r"LLaMA-Adapter does not support GPT2LMHeadModel: .*q_proj/k_proj/v_proj/o_proj .*GPT2Attention: no q_proj/k_proj/v_proj/o_proj projection"):
        LlamaAdapter().inject(model)
    assert not any(isinstance(m, LlamaAdapterAttention) for m in model.modules())


def test_bert_is_refused_naming_class_and_missing_projections(minilm_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path)
    with pytest.raises(ValueError, match=r"LLaMA-Adapter does not support BertModel: .*BertSelfAttention: no q_proj/k_proj/v_proj/o_proj projection"):
        find_llama_attention(model)


def test_projections_without_rotary_embeddings_are_refused():
    """An attention with q/k/v/o projections but absolute positions (OPT-like, here a hand-made one)."""
    from torch import nn

    class PlainAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))
            self.head_dim = 4

        def forward(self, hidden_states, attention_mask=None):
            return self.o_proj(self.v_proj(hidden_states)), None

    model = nn.Sequential(PlainAttention())
    with pytest.raises(ValueError, match=r"does not support Sequential: .*PlainAttention: its forward takes no position_embeddings"):
        inject_llama_adapter(model)
