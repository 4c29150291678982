"""The documented defaults of every method callback and of the QLoRA plugin, pinned, and seen in the injected layers.

Three sources, in order of preference:

* an oracle: Hugging Face PEFT's config dataclass defaults (``peft.LoraConfig().r``, ...) where a default is meant to
  be PEFT's, or another library the docstring names (Lightning's ``BackboneFinetuning``, bitsandbytes, transformers'
  ``BitsAndBytesConfig``), or another callback the docstring says the method equals (``UniPELT`` = gated ``LoRA`` +
  ``PrefixTuning`` + ``Houlsby``);
* a row of :data:`DOCUMENTED`: the value and the words of the docstring / README that state it (the test checks that
  the words are still there, so the row cannot drift from the documentation);
* :data:`SIGNATURE_ONLY`: defaults no documentation states (the signature, which ``--help`` shows, is all there is).

Every ``__init__`` argument that has a default is in one of them (:func:`test_every_default_is_pinned`).
"""

import dataclasses
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_peft.callbacks as cb
from lightning_peft.core import adapter_modules, count_parameters
from tests.conftest import tiny_llama

peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
CALLBACKS = [getattr(cb, n) for n in cb.__all__ if isinstance(getattr(cb, n), type) and n != "PEFTCallback"]


def _defaults(cls) -> dict:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if p.default is not inspect.Parameter.empty}


def _peft(config: str, field: str):
    (f,) = [f for f in dataclasses.fields(getattr(peft, config)) if f.name == field]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _qlora():
    pytest.importorskip("bitsandbytes")
    from lightning_peft.plugins import QLoRAPrecision

    return QLoRAPrecision


# -- oracles -------------------------------------------------------------------------------------------
#: (callback, argument) -> (PEFT config, field, how PEFT's value reads as ours)
PEFT_DEFAULTS = {
    ("LoRA", "r"): ("LoraConfig", "r", None),
    ("LoRA", "dropout"): ("LoraConfig", "lora_dropout", None),
    ("LoRA", "use_rslora"): ("LoraConfig", "use_rslora", None),
    ("LoRA", "use_dora"): ("LoraConfig", "use_dora", None),
    ("LoRA", "init"): ("LoraConfig", "init_lora_weights", {True: "kaiming", "gaussian": "gaussian"}.get),  # True: kaiming-uniform A, B = 0
    ("AdaLoRA", "init_r"): ("AdaLoraConfig", "init_r", None),
    ("AdaLoRA", "target_r"): ("AdaLoraConfig", "target_r", None),
    ("AdaLoRA", "tinit"): ("AdaLoraConfig", "tinit", None),
    ("AdaLoRA", "tfinal"): ("AdaLoraConfig", "tfinal", None),
    ("AdaLoRA", "delta_t"): ("AdaLoraConfig", "deltaT", None),
    ("AdaLoRA", "beta1"): ("AdaLoraConfig", "beta1", None),
    ("AdaLoRA", "beta2"): ("AdaLoraConfig", "beta2", None),
    ("AdaLoRA", "orth_reg_weight"): ("AdaLoraConfig", "orth_reg_weight", None),  # "0.5 is Hugging Face PEFT's default"
    ("AdaLoRA", "total_steps"): ("AdaLoraConfig", "total_step", None),
    ("AdaLoRA", "dropout"): ("AdaLoraConfig", "lora_dropout", None),
    ("IA3", "target_modules"): ("IA3Config", "target_modules", None),  # "the adapter equals peft.IA3Config()'s"
    ("IA3", "feedforward_modules"): ("IA3Config", "feedforward_modules", None),
    ("PTuning", "encoder"): ("PromptEncoderConfig", "encoder_reparameterization_type", lambda v: v.value.lower()),
    ("PTuning", "encoder_hidden_size"): ("PromptEncoderConfig", "encoder_hidden_size", None),  # None: the model's width
    ("PrefixTuning", "encoder_hidden_size"): ("PrefixTuningConfig", "encoder_hidden_size", None),
}

#: (callback, argument) -> (other class, its argument): "UniPELT: the same as LoRA(gate=True, target_modules=[query/value]),
#: PrefixTuning(gate=True) and Houlsby(sites=["ffn"], gate=True)"; "MAM: the same as PrefixTuning(num_virtual_tokens=30)
#: then ParallelAdapter(reduction_factor=2, scaling=4)"
SAME_AS = {
    ("UniPELT", "r"): ("LoRA", "r"),
    ("UniPELT", "alpha"): ("LoRA", "alpha"),
    ("UniPELT", "lora_dropout"): ("LoRA", "dropout"),
    ("UniPELT", "prefix_hidden_size"): ("PrefixTuning", "encoder_hidden_size"),
    ("UniPELT", "activation"): ("Houlsby", "activation"),
    ("MAMAdapter", "prefix_hidden_size"): ("PrefixTuning", "encoder_hidden_size"),
    ("MAMAdapter", "scaling"): ("ParallelAdapter", "scaling"),
    ("MAMAdapter", "activation"): ("ParallelAdapter", "activation"),
}


def _other_oracles():
    """(class, argument) -> the default a library the docstring names has."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    oracles = {
        # "Gradual unfreezing follows Lightning's BackboneFinetuning" ("Lightning's BackboneFinetuning uses 0.1")
        ("Selective", "unfreeze_lr_factor"): _defaults(BackboneFinetuning)["backbone_initial_ratio_lr"],
    }
    try:
        import bitsandbytes as bnb
        from transformers import BitsAndBytesConfig
    except ImportError:
        return oracles
    _, state = bnb.functional.quantize_4bit(torch.zeros(256, dtype=torch.float32), quant_type="nf4")
    oracles[("QLoRAPrecision", "blocksize")] = state.blocksize  # bitsandbytes' own 4-bit block ("64, as in the QLoRA paper")
    oracles[("QLoRAPrecision", "int8_threshold")] = BitsAndBytesConfig().llm_int8_threshold  # "6.0 as in the paper"
    return oracles


# -- documented in this package ----------------------------------------------------------------------------
CB = "lightning_peft/callbacks/"
#: (class, argument, value, file, the words there that state it)
DOCUMENTED = [
    ("LoRA", "adapter_name", "default", "lightning_peft/methods/lora.py", 'The first adapter is called ``"default"`` unless named otherwise'),
    ("PromptTuning", "adapter_name", "default", "lightning_peft/methods/_prompt.py", 'The prompt named ``"default"`` is the model\'s submodule ``attr_name``'),
    ("PTuning", "adapter_name", "default", "lightning_peft/methods/_prompt.py", 'The prompt named ``"default"`` is the model\'s submodule ``attr_name``'),
    ("PrefixTuning", "adapter_name", "default", "lightning_peft/methods/_prompt.py", 'The prompt named ``"default"`` is the model\'s submodule ``attr_name``'),
    ("LoRA", "rank_pattern", None, CB + "lora.py", "per-module ranks overriding ``r``"),
    ("LoRA", "alpha_pattern", None, CB + "lora.py", "per-module alphas overriding ``alpha``"),
    ("LoRA", "gate", False, "lightning_peft/methods/lora.py", "Gate (optional, off by default"),
    ("LoRA", "loraplus_lr_ratio", None, CB + "lora.py", "None (the default): one learning rate"),
    ("AdaLoRA", "budget", "rank", CB + "adalora.py", "``\"rank\"`` (the paper's and Hugging Face PEFT's)"),
    ("AdaLoRA", "log_ranks", True, CB + "adalora.py", "log the budget and each layer's rank to the Trainer's loggers after every optimizer step"),
    ("AdaLoRA", "heatmap", True, CB + "adalora.py", "at the end of training write ``adalora_ranks.png``"),
    ("Houlsby", "bottleneck_size", None, CB + "houlsby.py", "with a bottleneck of ``hidden / 16``"),
    ("Houlsby", "reduction_factor", None, CB + "houlsby.py", "bottleneck = hidden size / factor (default 16 when neither is given)"),
    ("Houlsby", "sites", ["attention", "ffn"], CB + "houlsby.py", "adapters after each block's attention output and feed-forward output"),
    ("Houlsby", "target_modules", None, CB + "houlsby.py", "None: the default sites above"),
    ("Houlsby", "gate", False, "lightning_peft/methods/houlsby.py", "Gate (optional, off by default"),
    ("ParallelAdapter", "bottleneck_size", None, CB + "parallel_adapter.py", "bottleneck ``hidden / 16``"),
    ("ParallelAdapter", "reduction_factor", None, CB + "parallel_adapter.py", "bottleneck = hidden size / factor (default 16 when neither is given)"),
    ("ParallelAdapter", "scaling", 4.0, CB + "parallel_adapter.py", "bottleneck ``hidden / 16``, ``s = 4``"),
    ("ParallelAdapter", "sites", ["ffn"], CB + "parallel_adapter.py", "With no arguments: the feed-forward sublayer of every block"),
    ("ParallelAdapter", "target_modules", None, CB + "parallel_adapter.py", "None: the default sites above"),
    ("PromptTuning", "num_virtual_tokens", 20, "lightning_peft/methods/_prompt.py", "Use e.g. 20 (the usual default)"),
    ("PromptTuning", "init", "vocab", "README.md", "prompt tuning, 20 tokens (vocabulary init)"),  # bench/quality.py: PromptTuning(num_virtual_tokens=20)
    ("PromptTuning", "init_text", None, CB + "prompt_tuning.py", "the text for ``init=\"text\"``"),
    ("PromptTuning", "tokenizer", None, CB + "prompt_tuning.py", "None takes the LightningModule's ``tokenizer``"),
    ("PTuning", "num_virtual_tokens", 20, "lightning_peft/methods/_prompt.py", "Use e.g. 20 (the usual default)"),
    ("PrefixTuning", "num_virtual_tokens", 20, "lightning_peft/methods/_prompt.py", "Use e.g. 20 (the usual default)"),
    ("PrefixTuning", "gate", False, "lightning_peft/methods/_prompt.py", "Gated prefixes (optional, off by default"),
    ("PTuningV2", "num_virtual_tokens", 20, "lightning_peft/methods/_prompt.py", "Use e.g. 20 (the usual default)"),
    ("LlamaAdapter", "adapter_len", 10, CB + "llama_adapter.py", "prompt tokens per adapted layer (the paper uses 10)"),
    ("LlamaAdapter", "adapter_layers", None, CB + "llama_adapter.py", "None for all of them"),
    ("MAMAdapter", "num_virtual_tokens", 30, CB + "mam_adapter.py", "The paper's defaults: 30 prefixes per layer"),
    ("MAMAdapter", "bottleneck_size", None, CB + "mam_adapter.py", "give this or ``reduction_factor`` (neither: hidden / 2)"),
    ("MAMAdapter", "reduction_factor", None, CB + "mam_adapter.py", "FFN bottleneck hidden / 2"),
    ("MAMAdapter", "ffn_target_modules", None, CB + "mam_adapter.py", "None: found by name"),
    ("UniPELT", "lora_target_modules", ["query", "value", "q_proj", "v_proj"], CB + "unipelt.py", "default: BERT ``query`` / ``value``, Llama-style ``q_proj`` / ``v_proj``"),
    ("UniPELT", "num_virtual_tokens", 10, "README.md", "gated LoRA q/v r=8 + 10 gated prefixes + gated FFN adapter 24"),
    ("UniPELT", "bottleneck_size", None, CB + "unipelt.py", "give this or ``reduction_factor`` (default hidden / 16)"),
    ("UniPELT", "reduction_factor", None, CB + "unipelt.py", "(default hidden / 16)"),
    ("UniPELT", "adapter_sites", ["ffn"], CB + "unipelt.py", "``\"ffn\"`` (the paper)"),
    ("UniPELT", "adapter_target_modules", None, CB + "unipelt.py", "None: found by name (``adapter_sites``)"),
    ("UniPELT", "log_gates", True, CB + "unipelt.py", "During training the gates' mean values are logged per layer"),
    ("BitFit", "biases", None, CB + "bitfit.py", "None trains every bias"),
    ("Selective", "train", None, CB + "selective.py", "None: ``[\"top:2\", \"head\"]``"),
    ("Selective", "unfreeze_schedule", None, CB + "selective.py", "optionally unfreeze more at given epochs"),
    ("QLoRAPrecision", "mode", "nf4-dq", "README.md", "QLoRA: 4-bit NF4 (+ double quantization)"),
    ("QLoRAPrecision", "compute_dtype", "bf16", "README.md", '`QLoRAPrecision(mode="nf4"|"nf4-dq"|"fp4"|"fp4-dq", compute_dtype="bf16")`'),
    ("QLoRAPrecision", "ignore_modules", None, "lightning_peft/plugins/qlora.py", "linear layers to keep unquantized"),
    ("QLoRAPrecision", "blocksize", 64, "lightning_peft/plugins/qlora.py", "weights per quantization block (64, as in the QLoRA paper)"),
    ("QLoRAPrecision", "int8_threshold", 6.0, "lightning_peft/plugins/qlora.py", "(6.0 as in the paper; 0.0: everything in int8)"),
]

#: arguments that switch something optional on; None (off) in every class that has them
OPTIONAL_OFF = {"exclude_modules": None, "trainable_modules": None, "save_dir": None}

#: defaults that no docstring or README states: (class, argument) -> (value, what the documentation says instead)
SIGNATURE_ONLY = {
    ("LoRA", "alpha"): (16.0, "no default in the docstring; the README's examples and configs use alpha=16 with r=8 (PEFT's lora_alpha is 8)"),
    ("LoRA", "target_modules"): ("all-linear", "no default in the docstring or README ('all-linear' is one of the forms)"),
    ("AdaLoRA", "alpha"): (16.0, "no default in the docstring; configs/adalora.yaml calls alpha 16 'peft's default' (PEFT's lora_alpha is 8)"),
    ("AdaLoRA", "target_modules"): ("all-linear", "no default in the docstring"),
    ("Houlsby", "activation"): ("relu", "no default in the docstring"),
    ("ParallelAdapter", "activation"): ("relu", "no default in the docstring (methods/parallel_adapter.py's formula uses relu)"),
}


def test_documented_words_are_still_there():
    texts = {}
    for cls, arg, _, path, words in DOCUMENTED:
        text = texts.setdefault(path, " ".join((REPO / path).read_text().split()))
        assert " ".join(words.split()) in text, f"{cls}.{arg}: {path} no longer says {words!r}: update the row"


@pytest.mark.parametrize("row", DOCUMENTED, ids=lambda r: f"{r[0]}.{r[1]}")
def test_documented_defaults(row):
    cls, arg, value, _, _ = row
    klass = _qlora() if cls == "QLoRAPrecision" else getattr(cb, cls)
    default = _defaults(klass)[arg]
    assert (list(default) if isinstance(default, tuple) else default) == value


@pytest.mark.parametrize("key", sorted(PEFT_DEFAULTS), ids=lambda k: f"{k[0]}.{k[1]}")
def test_defaults_are_peft_defaults(key):
    config, field, read = PEFT_DEFAULTS[key]
    theirs = _peft(config, field)
    assert _defaults(getattr(cb, key[0]))[key[1]] == (read(theirs) if read else theirs)


@pytest.mark.parametrize("key", sorted(SAME_AS), ids=lambda k: f"{k[0]}.{k[1]}")
def test_defaults_equal_the_methods_a_hybrid_is_made_of(key):
    other, arg = SAME_AS[key]
    assert _defaults(getattr(cb, key[0]))[key[1]] == _defaults(getattr(cb, other))[arg]


def test_defaults_equal_the_libraries_the_docstrings_name():
    for (cls, arg), value in _other_oracles().items():
        klass = _qlora() if cls == "QLoRAPrecision" else getattr(cb, cls)
        assert _defaults(klass)[arg] == value, (cls, arg)


@pytest.mark.parametrize("key", sorted(SIGNATURE_ONLY), ids=lambda k: f"{k[0]}.{k[1]}")
def test_undocumented_defaults_are_pinned(key):
    assert _defaults(getattr(cb, key[0]))[key[1]] == SIGNATURE_ONLY[key][0]


def test_every_default_is_pinned():
    """A new argument, or a callback, whose default is pinned nowhere fails here."""
    defined = set()
    for info in pkgutil.iter_modules(cb.__path__):
        module = importlib.import_module(f"lightning_peft.callbacks.{info.name}")
        defined |= {o.__name__ for o in vars(module).values() if isinstance(o, type) and issubclass(o, cb.PEFTCallback) and o.__module__ == module.__name__}
    assert defined - {"PEFTCallback"} == {c.__name__ for c in CALLBACKS}
    pinned = {(c, a) for c, a, *_ in DOCUMENTED} | set(PEFT_DEFAULTS) | set(SAME_AS) | set(_other_oracles()) | set(SIGNATURE_ONLY)
    classes = CALLBACKS + ([_qlora()] if ("QLoRAPrecision", "blocksize") in _other_oracles() else [])
    missing = []
    for klass in classes:
        for arg, default in _defaults(klass).items():
            if arg in OPTIONAL_OFF:
                assert default is OPTIONAL_OFF[arg], (klass.__name__, arg)
            elif (klass.__name__, arg) not in pinned:
                missing.append(f"{klass.__name__}.{arg}")
    assert not missing, f"defaults pinned nowhere: {missing}"


# -- the defaults reach the injected layers ---------------------------------------------------------------
def _named_params(model):
    return {n: p for n, p in model.named_parameters()}


def test_lora_defaults_give_peft_layers():
    ours = tiny_llama()
    cb.LoRA().inject(ours)
    # PEFT with its own defaults, alpha and targets set to ours (PEFT has no default for either)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules="all-linear", lora_alpha=16))
    want = {
        n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"], getattr(m.lora_dropout["default"], "p", 0.0))
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    got = {}
    for n, m in adapter_modules(ours):
        spec = m.specs["default"]
        got[n] = (spec.r, spec.scaling, spec.dropout)
        a, b = m.lora_a["default"], m.lora_b["default"]
        assert not b.any() and a.abs().max() <= 1 / a.shape[1] ** 0.5  # kaiming-uniform(a=sqrt(5)) as peft's init True
        assert not spec.use_rslora
    assert got == want and len(got) == 14 and {v[:2] for v in got.values()} == {(8, 2.0)}


def test_adalora_defaults_reach_the_layers_and_the_schedule():
    cfg = peft.AdaLoraConfig(target_modules="all-linear", total_step=100)
    callback = cb.AdaLoRA(total_steps=100)
    model = tiny_llama()
    callback.inject(model)
    layers = [m for _, m in adapter_modules(model)]
    assert len(layers) == 14 and {(m.init_r, m.r) for m in layers} == {(cfg.init_r, cfg.init_r)}
    assert {m.scaling for m in layers} == {16.0 / cfg.init_r}
    alloc = callback.allocator
    assert (alloc.target_r, alloc.tinit, alloc.tfinal, alloc.delta_t, alloc.beta1, alloc.beta2, alloc.unit) == (
        cfg.target_r, cfg.tinit, cfg.tfinal, cfg.deltaT, cfg.beta1, cfg.beta2, "rank"
    )
    assert callback.orth_reg_weight == cfg.orth_reg_weight


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0))


def _tiny_bert(layers=2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, vocab_size=50))


@pytest.mark.parametrize("build", [tiny_llama, _tiny_gpt2, _tiny_bert], ids=["llama", "gpt2", "bert"])
def test_ia3_defaults_are_peft_defaults_on_each_family(build):
    from lightning_peft.methods.ia3 import IA3Linear

    ours = build()
    cb.IA3().inject(ours)
    theirs = peft.get_peft_model(build(), peft.IA3Config())
    got = {n: m.feedforward for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    want = {n.removeprefix("base_model.model."): m.is_feedforward for n, m in theirs.named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert got == want and any(got.values()) and not all(got.values())


HIDDEN = 32  # tiny_llama's width; 2 blocks


def _inject(callback, model=None):
    model = model if model is not None else tiny_llama()
    callback.inject(model)
    return model, _named_params(model)


def test_bottleneck_adapter_defaults_reach_the_layers():
    _, p = _inject(cb.Houlsby())
    downs = {n.rsplit(".", 1)[0]: t.shape for n, t in p.items() if n.endswith("houlsby_down")}
    assert downs == {f"model.layers.{i}.{s}": (HIDDEN // 16, HIDDEN) for i in range(2) for s in ("self_attn.o_proj", "mlp.down_proj")}
    assert {m.activation for _, m in adapter_modules(_inject(cb.Houlsby())[0])} == {"relu"}

    model, p = _inject(cb.ParallelAdapter())
    downs = {n.rsplit(".", 1)[0]: t.shape for n, t in p.items() if n.endswith("parallel_down")}
    assert downs == {f"model.layers.{i}.mlp": (HIDDEN // 16, HIDDEN) for i in range(2)}
    assert {(m.scaling, m.activation) for _, m in adapter_modules(model)} == {(4.0, "relu")}


def test_hybrid_defaults_reach_the_layers():
    model, p = _inject(cb.MAMAdapter())
    assert p["prefix_tuning.prefix_embedding"].shape == (30, HIDDEN) and p["prefix_tuning.prefix_mlp.0.weight"].shape == (HIDDEN, HIDDEN)
    downs = {n.rsplit(".", 1)[0]: t.shape for n, t in p.items() if n.endswith("parallel_down")}
    assert downs == {f"model.layers.{i}.mlp": (HIDDEN // 2, HIDDEN) for i in range(2)}
    assert {m.scaling for n, m in adapter_modules(model) if n.endswith("mlp")} == {4.0}

    model, p = _inject(cb.UniPELT())
    lora = {n: m.specs["default"] for n, m in adapter_modules(model) if hasattr(m, "specs")}
    assert sorted(lora) == [f"model.layers.{i}.self_attn.{s}_proj" for i in range(2) for s in "qv"]
    assert {(s.r, s.scaling, s.dropout) for s in lora.values()} == {(8, 2.0, 0.0)}
    assert p["prefix_tuning.prefix_embedding"].shape == (10, HIDDEN) and p["prefix_tuning.prefix_mlp.0.weight"].shape == (HIDDEN, HIDDEN)
    downs = {n.rsplit(".", 1)[0]: t.shape for n, t in p.items() if n.endswith("houlsby_down")}
    assert downs == {f"model.layers.{i}.mlp.down_proj": (HIDDEN // 16, HIDDEN) for i in range(2)}


def test_soft_prompt_defaults_reach_the_layers():
    model, p = _inject(cb.PromptTuning())
    prompt, vocab = p["prompt_tuning.prompt_embeddings"], model.get_input_embeddings().weight
    assert prompt.shape == (20, HIDDEN)
    assert all((row == vocab).all(-1).any() for row in prompt)  # "vocab": rows of the embedding matrix

    model, p = _inject(cb.PTuning())
    assert p["p_tuning.ptuning_embedding"].shape == (20, HIDDEN)
    mlp = model.p_tuning.ptuning_mlp
    assert isinstance(mlp, nn.Sequential) and [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [HIDDEN] * 3

    _, p = _inject(cb.PrefixTuning())
    assert p["prefix_tuning.prefix_embedding"].shape == (20, HIDDEN) and p["prefix_tuning.prefix_mlp.0.weight"].shape == (HIDDEN, HIDDEN)

    _, p = _inject(cb.PTuningV2())
    assert p["p_tuning_v2.prefix_kv"].shape[0] == 20

    _, p = _inject(cb.LlamaAdapter())
    prompts = {n: t.shape for n, t in p.items() if n.endswith("adaption_prompt")}
    assert prompts == {f"model.layers.{i}.self_attn.adaption_prompt": (1, 10, HIDDEN) for i in range(2)}


def test_selective_defaults_train_every_bias_or_the_top_two_blocks_and_head():
    model = _tiny_bert()
    cb.BitFit().inject(model)
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert [n for n, q in model.named_parameters() if q.requires_grad] == biases and len(biases) == 1 + 2 * 8 + 2  # embeddings, blocks, pooler, head

    model = _tiny_bert(layers=4)
    cb.Selective().inject(model)
    trained = {n.split(".")[3] if n.startswith("bert.encoder.layer.") else n.split(".")[0] for n, q in model.named_parameters() if q.requires_grad}
    assert trained == {"2", "3", "classifier"}
    assert count_parameters(model).changed == sum(q.numel() for q in model.bert.encoder.layer[2:].parameters()) + sum(q.numel() for q in model.classifier.parameters())


def test_qlora_defaults_reach_the_quantized_weights():
    QLoRAPrecision = _qlora()
    from lightning_peft.methods.lora import LoRALinear
    from lightning_peft.quant import QuantLinear

    plugin = QLoRAPrecision()
    assert plugin.compute_dtype == torch.bfloat16 and plugin.int8_threshold == 6.0
    model = tiny_llama()
    cb.LoRA(target_modules=["q_proj", "v_proj"]).inject(model)
    plugin.convert_module(model)
    weights = [m.weight for m in model.modules() if isinstance(m, (LoRALinear, QuantLinear))]
    assert len(weights) == 14
    for w in weights:
        state = w.quant_state
        assert (state.quant_type, state.nested, state.blocksize, state.dtype) == ("nf4", True, 64, torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert re.search(r"mode='nf4-dq', compute_dtype=torch.bfloat16", repr(plugin))
