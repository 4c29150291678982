"""Checks the soft-prompt methods share: generation, padding invariance, PEFT round trips."""

import warnings

import torch

from lightning_peft.compat import cache_arg
from lightning_peft.io import load_adapter, save_adapter


def _peft_cache_ok() -> bool:
    from transformers import LlamaModel

    return cache_arg(LlamaModel.forward) == "past_key_values"


#: Hugging Face PEFT (0.21) passes and looks for the cache as ``past_key_values``. On transformers >= 5.24, which
#: calls it ``cache``, its prefix tuning refuses every model ("Model does not support past key values") and its
#: prompt-learning ``generate()`` inserts the prompt again at every step: peft is no oracle there, so the checks
#: that run peft's forward with prefixes or peft's generate() run only where this is True (the floor CI job).
PEFT_CACHE_OK = _peft_cache_ok()


def peft_generate_agrees(theirs, ours, ids) -> None:
    """peft's ``generate()`` gives our tokens, where peft handles the cache (:data:`PEFT_CACHE_OK`)."""
    if PEFT_CACHE_OK:
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(theirs.generate(input_ids=ids, **gen), ours.generate(input_ids=ids, **gen))


def randomize(layer, seed: int = 1, scale: float = 0.5) -> None:
    """Move every adapter parameter away from its init, so a check cannot pass on a no-op prompt."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in layer.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def greedy_loop(model, ids: torch.Tensor, mask: torch.Tensor, steps: int, position_ids=None) -> torch.Tensor:
    """The oracle for ``generate()``: ``steps`` argmax tokens, each from a full forward over the whole sequence
    (no cache). ``position_ids`` (optional) are extended by one per new token, as ``generate()`` extends given ones."""
    seq, m, pos = ids, mask, position_ids
    with torch.no_grad():
        for _ in range(steps):
            kw = {} if pos is None else {"position_ids": pos}
            nxt = model(input_ids=seq, attention_mask=m, **kw).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], dim=1), torch.cat([m, torch.ones_like(nxt)], dim=1)
            pos = None if pos is None else torch.cat([pos, pos[:, -1:] + 1], dim=1)
    return seq


def check_generate_equals_greedy_loop(model, steps: int = 5) -> None:
    """``generate()`` (with its cache) gives the tokens of a greedy loop of full forwards (:func:`greedy_loop`):

    * unpadded and left-padded, positions left to the model (derived from the mask); a left-padded row also
      generates what it generates alone;
    * unpadded, left- and right-padded with explicit ``position_ids`` (counted over the real tokens; right padding
      repeats the last real position), which ``generate()`` carries forward one per new token.
    """
    ids = torch.tensor([[5, 17, 33, 2, 9], [40, 41, 42, 43, 44]])
    full = torch.ones_like(ids)
    gen = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=full, **gen)
    assert torch.equal(out, greedy_loop(model, ids, full, steps)), (out, greedy_loop(model, ids, full, steps))
    short = torch.tensor([[7, 8, 9]])
    left = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1), ids[1:]])
    left_mask = torch.cat([torch.tensor([[0, 0, 1, 1, 1]]), full[1:]])
    alone = model.generate(input_ids=short, **gen)
    batch = model.generate(input_ids=left, attention_mask=left_mask, **gen)
    assert torch.equal(batch[0, 2:], alone[0]), (batch, alone)
    assert torch.equal(batch[1], out[1])
    assert torch.equal(batch, greedy_loop(model, left, left_mask, steps)), (batch, greedy_loop(model, left, left_mask, steps))
    right = torch.cat([torch.cat([short, torch.zeros(1, 2, dtype=torch.long)], dim=1), ids[1:]])
    right_mask = torch.cat([torch.tensor([[1, 1, 1, 0, 0]]), full[1:]])
    for x, m in ((ids, full), (left, left_mask), (right, right_mask)):
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        got = model.generate(input_ids=x, attention_mask=m, position_ids=pos, **gen)
        expected = greedy_loop(model, x, m, steps, position_ids=pos)
        assert torch.equal(got, expected), (m, got, expected)


def _out(model, out, n_out: int):
    """The last ``n_out`` positions of the logits (causal LM) or the logits (classification)."""
    return out.logits[:, -n_out:] if out.logits.dim() == 3 else out.logits


def check_padding_invariance(model, a: torch.Tensor, b: torch.Tensor, pad_id: int = 0, atol: float = 1e-5, sides=("left", "right")) -> None:
    """Samples ``a`` (short) and ``b`` (long), left- and right-padded into one batch, give each the result it gets alone.

    For causal LMs the logits of the real tokens are compared; for classifiers the class logits. (A BERT
    classifier pools position 0, so left padding changes the base model itself: test it on the right only.)
    """
    model.eval()
    with torch.no_grad():
        alone = [model(input_ids=x[None], attention_mask=torch.ones(1, len(x), dtype=torch.long)) for x in (a, b)]
        pad = len(b) - len(a)
        for side in sides:
            filler = torch.full((pad,), pad_id, dtype=torch.long)
            row = torch.cat([filler, a]) if side == "left" else torch.cat([a, filler])
            m = torch.cat([torch.zeros(pad), torch.ones(len(a))]) if side == "left" else torch.cat([torch.ones(len(a)), torch.zeros(pad)])
            out = model(input_ids=torch.stack([row, b]), attention_mask=torch.stack([m, torch.ones(len(b))]).long())
            logits = out.logits
            if logits.dim() == 3:  # (B, n + T, V): the real positions sit at the end (left) or before the padding (right)
                T = len(b)
                real = logits[0, -len(a):] if side == "left" else logits[0, logits.shape[1] - T: logits.shape[1] - T + len(a)]
                torch.testing.assert_close(real, alone[0].logits[0, -len(a):], atol=atol, rtol=0)
                torch.testing.assert_close(logits[1, -T:], alone[1].logits[0, -T:], atol=atol, rtol=0)
            else:
                torch.testing.assert_close(logits[0], alone[0].logits[0], atol=atol, rtol=0)
                torch.testing.assert_close(logits[1], alone[1].logits[0], atol=atol, rtol=0)


def check_peft_round_trip(tmp_path, ours, make_base, batch: dict, atol: float = 1e-5):
    """``ours`` (a model carrying the adapter) -> files -> ``peft.PeftModel`` gives equal logits, and peft's own
    save of that model -> :func:`load_adapter` on a fresh base gives equal logits again (and, for a causal LM, the
    same ``generate()`` tokens). Where peft cannot run prefixes (:data:`PEFT_CACHE_OK` False) peft's logits are not
    compared; the files still go through peft both ways."""
    import peft

    from lightning_peft.methods.prefix_tuning import PrefixKV

    ours.eval()
    peft_runs = PEFT_CACHE_OK or not any(isinstance(m, PrefixKV) for m in ours.modules())
    save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_base(), tmp_path / "ours").eval()
        with torch.no_grad():
            expected = ours(**batch).logits
            if peft_runs:
                torch.testing.assert_close(theirs(**batch).logits, expected, atol=atol, rtol=0)
        theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(make_base(), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, expected, atol=atol, rtol=0)
    if hasattr(back, "generate") and expected.dim() == 3:
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(back.generate(input_ids=batch["input_ids"], **gen), ours.generate(input_ids=batch["input_ids"], **gen))
    return theirs, back


def tiny_bert_classifier(seed: int = 0):
    """A tiny random-init ``BertForSequenceClassification`` (2 labels, no dropout: training steps are deterministic;
    float64, so that two implementations' rounding does not grow through Adam's normalisation)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(cfg).double().train()


def check_trains_like_peft(ours, theirs, names: dict[str, str], batch: dict, steps: int = 4, lr: float = 1e-2) -> None:
    """Our model and a ``peft`` model with the same base: after copying peft's initial encoder weights into ours
    (``names``: our parameter -> peft's, both relative to the models), ``steps`` AdamW steps (weight decay 0.01) on
    ``batch`` give the same loss at every step and the same gradients and weights at the end (weights to 0.1% of one
    step: Adam's normalisation magnifies rounding in coordinates whose gradient is near zero). Every one of our
    trainable parameters must be named in ``names`` or be a ``classifier`` parameter."""
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    other = dict(theirs.named_parameters())
    unmapped = sorted(n for n in mine if n not in names and not n.startswith("classifier."))
    assert not unmapped, f"trainable parameters with no PEFT counterpart: {unmapped}"
    for n in mine:  # PEFT trains a copy of the classifier (modules_to_save)
        names.setdefault(n, f"base_model.{n.replace('classifier.', 'classifier.modules_to_save.default.')}")
    theirs_trainable = sorted(n for n, p in other.items() if p.requires_grad)
    assert theirs_trainable == sorted(names[n] for n in mine), (theirs_trainable, sorted(mine))
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(other[names[n]])
    opts = [torch.optim.AdamW(list(mine.values()), lr=lr, weight_decay=0.01),
            torch.optim.AdamW([other[names[n]] for n in mine], lr=lr, weight_decay=0.01)]
    for step in range(steps):
        losses = []
        for model, opt in zip((ours, theirs), opts):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], atol=1e-8, rtol=0, msg=lambda m: f"step {step}: {m}")
    for n, p in mine.items():
        q = other[names[n]]
        torch.testing.assert_close(p.grad, q.grad, atol=1e-8, rtol=1e-6, msg=lambda m: f"grad of {n}: {m}")
        torch.testing.assert_close(p, q, atol=1e-3 * lr, rtol=0, msg=lambda m: f"{n}: {m}")
