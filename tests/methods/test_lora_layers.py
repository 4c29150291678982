"""LoRA on ``nn.Embedding`` and ``nn.Conv1d`` / ``nn.Conv2d`` (:mod:`lightning_peft.methods.lora_layers`): the math,
Hugging Face PEFT's values both ways, merge, unload, and what is refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_peft as lp
from lightning_peft.methods.lora import LoRALinear, inject_lora
from lightning_peft.methods.lora_layers import LoRAConv, LoRAEmbedding
from tests.conftest import tiny_llama
from tests.methods.test_dora import _randomize_adapters as _randomize


class Net(nn.Module):
    """Token embeddings read by a Conv1d, an image through two Conv2d (stride, padding, 'same', bias or not)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv1d = nn.Conv1d(8, 5, 3, padding=1)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False)
        self.conv_same = nn.Conv2d(6, 4, (3, 2), padding="same")
        self.head = nn.Linear(9, 3)

    def forward(self, ids, img):
        t = self.conv1d(self.emb(ids).transpose(1, 2)).mean(-1)  # (B, 5)
        v = self.conv_same(self.conv(img)).mean((2, 3))  # (B, 4)
        return self.head(torch.cat([t, v], -1))


TARGETS = ["emb", "conv1d", "conv", "conv_same", "head"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 20, (2, 7), generator=g), torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64)


def test_each_layer_computes_the_base_module_with_w_plus_the_update():
    """``layer(x)`` is the base module's function of ``x`` with weight ``W + s B A`` (reshaped), in float64."""
    torch.manual_seed(0)
    model = Net().double()
    ids, img = _inputs()
    inject_lora(model, TARGETS, r=2, alpha=6)
    _randomize(model)
    assert isinstance(model.emb, LoRAEmbedding) and isinstance(model.conv, LoRAConv) and isinstance(model.conv1d, LoRAConv)
    assert type(model.head) is LoRALinear
    emb = model.emb
    want = F.embedding(ids, emb.weight + emb.delta_weight().to(torch.float64), padding_idx=0)
    torch.testing.assert_close(emb(ids), want, rtol=1e-6, atol=1e-6)  # delta_weight is float32
    x1 = torch.randn(2, 8, 7, dtype=torch.float64)
    torch.testing.assert_close(model.conv1d(x1), F.conv1d(x1, model.conv1d.weight + model.conv1d.delta_weight().double(), model.conv1d.bias, padding=1), rtol=1e-6, atol=1e-6)
    conv = model.conv
    torch.testing.assert_close(conv(img), F.conv2d(img, conv.weight + conv.delta_weight().double(), None, stride=2, padding=1), rtol=1e-6, atol=1e-6)
    assert conv.delta_weight().shape == conv.weight.shape == (6, 3, 3, 3)
    h = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    same = model.conv_same
    torch.testing.assert_close(same(h), F.conv2d(h, same.weight + same.delta_weight().double(), same.bias, padding="same"), rtol=1e-6, atol=1e-6)


def test_equal_outputs_and_gradients_with_peft_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Net().double()
    ids, img = _inputs()
    ours = copy.deepcopy(base)
    lp.LoRA(r=2, alpha=6, target_modules=TARGETS).inject(ours)
    _randomize(ours)
    lp.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    a, b = ours(ids, img), theirs(ids, img)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    a.square().sum().backward()
    b.square().sum().backward()
    peer_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    spelled = {"emb": ("lora_embedding_A.default", "lora_embedding_B.default")}
    checked = 0
    for name, layer in ours.named_modules():
        if isinstance(layer, LoRALinear):
            pa, pb = spelled.get(name, ("lora_A.default.weight", "lora_B.default.weight"))
            for mine, key in ((layer.lora_a["default"], pa), (layer.lora_b["default"], pb)):
                peer = peer_grads[f"base_model.model.{name}.{key}"]
                torch.testing.assert_close(mine.grad, peer.reshape(mine.shape), rtol=1e-9, atol=1e-12)
                checked += 1
    assert checked == 2 * len(TARGETS)

    # peft's own adapter (every factor random) -> its files -> ours
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, init_lora_weights=False))
    model.save_pretrained(tmp_path / "theirs")
    back = lp.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(back(ids, img), model(ids, img), rtol=0, atol=1e-12)


def test_a_llama_with_lora_on_its_embeddings_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=0).double()
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = copy.deepcopy(base)
    lp.LoRA(r=4, alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]).inject(ours)
    _randomize(ours)
    lp.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-10)


def test_merge_unmerge_and_unload_give_back_plain_modules():
    torch.manual_seed(0)
    model = Net()
    ids, img = _inputs()
    img = img.float()
    base_out = model(ids, img)
    inject_lora(model, TARGETS, r=2, alpha=6)
    _randomize(model)
    want = model(ids, img)
    with lp.disable_adapters(model):
        torch.testing.assert_close(model(ids, img), base_out, rtol=0, atol=0)
    lp.merge_adapters(model)
    torch.testing.assert_close(model(ids, img), want, rtol=1e-5, atol=1e-5)
    lp.unmerge_adapters(model)
    torch.testing.assert_close(model(ids, img), want, rtol=1e-5, atol=1e-5)
    merged = lp.unload(copy.deepcopy(model), merge=True)
    assert [type(merged.get_submodule(n)) for n in TARGETS] == [nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv2d, nn.Linear]
    torch.testing.assert_close(merged(ids, img), want, rtol=1e-5, atol=1e-5)
    plain = lp.unload(model)
    assert merged.conv.padding == plain.conv.padding == (1, 1) and plain.emb.padding_idx == 0
    torch.testing.assert_close(plain(ids, img), base_out, rtol=1e-6, atol=1e-6)


def test_all_linear_stays_linear():
    model = Net()
    names = inject_lora(model, "all-linear", r=2)
    assert names == [] or all(type(model.get_submodule(n)) is LoRALinear for n in names)
    assert type(model.emb) is nn.Embedding and type(model.conv) is nn.Conv2d
    lp.LoRA(r=2, target_modules=["emb"]).inject(model)
    before = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    inject_lora(model, "all-linear", r=2, adapter_name="second")
    assert "second" not in model.emb.specs and all("second" in model.get_submodule(n).specs for n in before if n != "emb")


def test_what_does_not_fit_is_refused_before_anything_changes():
    model = Net()
    for kwargs, match in (
        (dict(use_dora=True), "DoRA on Embedding is not supported"),
        (dict(init="pissa"), "init='pissa' on Embedding is not supported"),
        (dict(gate=True), "Gates"),
    ):
        with pytest.raises(ValueError, match=match):
            inject_lora(model, ["emb"], **kwargs)
    model.grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=1.*got groups=2"):
        inject_lora(model, ["conv", "grouped"])

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 3.0

    model.scaled = Scaled(10, 4)
    with pytest.raises(TypeError, match="Scaled is an Embedding with its own forward"):
        inject_lora(model, ["emb", "scaled"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_merging_into_a_tied_embedding_is_refused():
    """The input embedding of a model with tied weights is its output head's weight too: a merge would change both."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    cfg = tiny_llama_config()
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inject_lora(model, ["embed_tokens"], r=2)
    _randomize(model)
    before = model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match="shared with \\['lm_head.weight'\\].*tied"):
        lp.merge_adapters(model)
    assert torch.equal(model.lm_head.weight, before) and not model.model.embed_tokens.merged


def test_qlora_quantizes_the_linears_and_leaves_embedding_and_conv_layers():
    pytest.importorskip("bitsandbytes")
    from lightning_peft.plugins.qlora import QLoRAPrecision
    from lightning_peft.quant import is_quantized

    model = tiny_llama(seed=0, hidden=64)
    inject_lora(model, ["embed_tokens", "q_proj"], r=2)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    QLoRAPrecision("nf4", "fp32").convert_module(model)
    assert is_quantized(model.model.layers[0].self_attn.q_proj.weight)
    assert not is_quantized(model.model.embed_tokens.weight)
    model(input_ids=torch.randint(1, 100, (1, 5))).logits.sum().backward()
    assert model.model.embed_tokens.lora_b["default"].grad is not None


def test_trains_through_the_callback_and_the_checkpoint_loads_back(tmp_path):
    """A vision-style model (convolutions) through the Trainer: the loss goes down and the adapter-only checkpoint
    rebuilds the same model."""
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

        def training_step(self, batch, _):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)

        def forward(self, x):
            return self.net(x)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = Classifier()
    module.losses = []
    trainer = L.Trainer(accelerator="cpu", max_epochs=6, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.callbacks.append(lp.LoRA(r=2, alpha=4, target_modules=["net.0", "net.2"], trainable_modules=["net.6"]))
    trainer.fit(module, data)
    assert isinstance(module.net[0], LoRAConv)
    assert sum(module.losses[-4:]) < sum(module.losses[:4])
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = lp.load_adapter_checkpoint(Classifier(), tmp_path / "last.ckpt")
    torch.testing.assert_close(loaded(x), module(x), rtol=0, atol=0)
