"""A small real SST-2 batch and a MiniLM classifier, for the per-method learning tests."""

import torch

from lightning_peft.tasks.data import read_table


def sst2_batch(minilm_path, shared_data, n: int = 32, seed: int = 0):
    """``n`` rows of the GLUE SST-2 training set (a fixed random draw), tokenized for MiniLM."""
    from transformers import AutoTokenizer

    rows = read_table(shared_data / "glue" / "SST-2" / "train.tsv")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(rows), generator=g)[:n].tolist()
    tok = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    enc = tok([rows[i]["sentence"] for i in idx], padding=True, truncation=True, max_length=48, return_tensors="pt")
    enc["labels"] = torch.tensor([int(rows[i]["label"]) for i in idx])
    return dict(enc)


def minilm_classifier(minilm_path, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2, local_files_only=True).eval()


def minilm_counts(minilm_path, *callbacks):
    """Typed parameter counts of a fresh MiniLM classifier after each callback injected its adapters."""
    from lightning_peft.core import count_parameters

    model = minilm_classifier(minilm_path)
    for cb in callbacks:
        cb.inject(model)
    return count_parameters(model)


def train_losses(model, batch, steps: int = 20, lr: float = 1e-2) -> list[float]:
    """Adam on the trainable parameters over the same batch; the loss of every step (dropout off)."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def tiny_decoder(family: str, seed: int = 0):
    """A tiny random-init decoder of one supported shape: ``"llama"``, ``"gpt2"``, ``"qwen2"``, ``"opt"`` or ``"falcon"``
    (multi-query attention: one key/value head) (eager attention)."""
    from transformers import FalconConfig, FalconForCausalLM, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from tests.conftest import tiny_llama

    if family == "llama":
        return tiny_llama(seed=seed)
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0, initializer_range=0.2,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: resume is exact
        cfg._attn_implementation = "eager"
        return GPT2LMHeadModel(cfg).eval()
    if family == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, initializer_range=0.2)
        cfg._attn_implementation = "eager"
        return Qwen2ForCausalLM(cfg).eval()
    if family == "opt":  # OPTForCausalLM.forward calls self.model.decoder directly, not self.model
        cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, word_embed_proj_dim=32,
                        max_position_embeddings=64, init_std=0.2, dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = "eager"
        return OPTForCausalLM(cfg).eval()
    if family == "falcon":  # multi-query attention: one key/value head for 4 query heads
        cfg = FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, initializer_range=0.2,
                           hidden_dropout=0.0, attention_dropout=0.0)
        cfg._attn_implementation = "eager"
        return FalconForCausalLM(cfg).eval()
    raise ValueError(family)


DECODERS = ("llama", "gpt2", "qwen2")
#: the decoders the soft prompts are tested on: OPT nests its backbone (model.decoder), Falcon has one key/value head
PROMPT_DECODERS = ("llama", "gpt2", "qwen2", "opt", "falcon")
