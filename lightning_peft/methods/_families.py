"""Where things are in Hugging Face transformer blocks: default targets per model family.

The methods of this package find their default sites by module name, not by ``model_type``, so a
LightningModule holding a Hugging Face model (names prefixed with ``model.``) works the same:

* the attention output projection and the feed-forward output projection of each block
  (Houlsby adapters, parallel adapters);
* the ``nn.ModuleList`` of transformer blocks (selective freezing: "the top k blocks").

Families covered: BERT and its relatives (RoBERTa, ELECTRA, all-MiniLM-L6-v2), Llama-style decoders
(Llama, Mistral, Qwen2/3, Gemma), GPT-2, DistilBERT.
"""

from __future__ import annotations

from torch import nn

# (family, attention-output suffixes, feed-forward-output suffixes); the first family with a match wins.
_OUTPUT_SITES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("bert", ("attention.output.dense",), ("output.dense",)),
    ("llama", ("self_attn.o_proj",), ("mlp.down_proj",)),
    ("gpt2", ("attn.c_proj",), ("mlp.c_proj",)),
    ("distilbert", ("attention.out_lin",), ("ffn.lin2",)),
)

# Sublayers as whole modules, for parallel adapters: (family, attention sublayer, feed-forward sublayer).
# BERT's ``attention.output`` / ``output`` are the modules that add the residual (``forward(hidden_states,
# input_tensor)``), which the parallel adapter uses to reach the sublayer's input.
_SUBLAYERS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("bert", ("attention.output",), ("output",)),
    ("llama", ("self_attn",), ("mlp",)),
    ("gpt2", ("attn",), ("mlp",)),
)

#: Names of the ``nn.ModuleList`` holding the blocks, per family.
_BLOCK_LISTS = ("encoder.layer", "model.layers", "layers", "transformer.h", "h", "transformer.layer", "blocks")


def _ends_with(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _find_sites(model: nn.Module, table, kinds: tuple[str, ...]) -> tuple[str, dict[str, list[str]]]:
    names = [n for n, _ in model.named_modules() if n]
    for family, attn, ffn in table:
        found = {"attention": [], "ffn": []}
        for n in names:
            is_attn = any(_ends_with(n, s) for s in attn)
            if is_attn:
                found["attention"].append(n)
            elif any(_ends_with(n, s) for s in ffn):
                found["ffn"].append(n)
        # a family is recognised only if both kinds of site exist (BERT's "output" alone is too generic)
        if found["attention"] and found["ffn"]:
            return family, {k: found[k] for k in kinds}
    return "", {k: [] for k in kinds}


def output_projections(model: nn.Module, sites: tuple[str, ...] = ("attention", "ffn")) -> tuple[str, list[str]]:
    """``(family, names)``: the attention-output and/or feed-forward-output projections of every block.

    Returns ``("", [])`` when no known family matches.
    """
    family, found = _find_sites(model, _OUTPUT_SITES, sites)
    return family, [n for k in sites for n in found[k]]


def sublayers(model: nn.Module, sites: tuple[str, ...] = ("ffn",)) -> tuple[str, list[str]]:
    """``(family, names)``: the attention and/or feed-forward sublayer modules of every block."""
    family, found = _find_sites(model, _SUBLAYERS, sites)
    return family, [n for k in sites for n in found[k]]


def describe(table_name: str) -> str:
    """The names a default search looks for, for error messages."""
    table = _OUTPUT_SITES if table_name == "outputs" else _SUBLAYERS
    return "; ".join(f"{fam}: {list(a)} + {list(f)}" for fam, a, f in table)


def block_list(model: nn.Module) -> tuple[str, list[str]]:
    """``(list name, block names)`` of the transformer blocks: the longest ``nn.ModuleList`` of same-typed
    children among the known names (``encoder.layer``, ``model.layers``, ``transformer.h``, ...), else the
    longest such list anywhere. ``("", [])`` if there is none.
    """
    candidates = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            known = any(_ends_with(name, s) for s in _BLOCK_LISTS)
            candidates.append((known, len(m), name))
    if not candidates:
        return "", []
    _, _, name = max(candidates)
    n = len(model.get_submodule(name))
    return name, [f"{name}.{i}" if name else str(i) for i in range(n)]
