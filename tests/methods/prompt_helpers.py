"""Checks the soft-prompt methods share: generation, padding invariance, PEFT round trips."""

import warnings

import torch

from lightning_peft.io import load_adapter, save_adapter


def randomize(layer, seed: int = 1, scale: float = 0.5) -> None:
    """Move every adapter parameter away from its init, so a check cannot pass on a no-op prompt."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in layer.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def check_generate_equals_greedy_loop(model, steps: int = 5) -> None:
    """``generate()`` (with its cache) gives the tokens of a plain argmax loop over the whole sequence; also with
    left padding, where each row equals that row generated alone."""
    ids = torch.tensor([[5, 17, 33, 2, 9], [40, 41, 42, 43, 44]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq), (out, seq)
    short = torch.tensor([[7, 8, 9]])
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    alone = model.generate(input_ids=short, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    batch = model.generate(input_ids=torch.cat([padded, ids[1:]]), attention_mask=torch.cat([mask, torch.ones(1, 5, dtype=torch.long)]),
                           max_new_tokens=steps, do_sample=False, pad_token_id=0)
    assert torch.equal(batch[0, 2:], alone[0]), (batch, alone)
    assert torch.equal(batch[1], out[1])


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
    save of that model -> :func:`load_adapter` on a fresh base gives equal logits again."""
    import peft

    ours.eval()
    save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_base(), tmp_path / "ours").eval()
        with torch.no_grad():
            expected = ours(**batch).logits
            torch.testing.assert_close(theirs(**batch).logits, expected, atol=atol, rtol=0)
        theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(make_base(), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, expected, atol=atol, rtol=0)
    return theirs, back
