"""Wrong values never load silently, and a failed load leaves everything as it was (issue: trust boundary).

Classes: typed arguments checked strictly (a string is not a bool, ``inf`` is not a scale) for every callback at
once; adapter configs typed strictly and without non-finite numbers; NaN/inf tensors refused in files and
checkpoints; an integrity digest of the tensors verified on load; ``modules_to_save`` without its tensors and a
tensor spelled twice refused; ``load_adapter_checkpoint`` all or nothing.
"""

import inspect
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_peft import LoRA, load_adapter, load_adapter_checkpoint, save_adapter
from lightning_peft.callbacks.base import PEFTCallback, adapter_checkpoint_state
from lightning_peft.io import AdapterFileError
from lightning_peft.methods.lora import inject_lora
from tests.callbacks.helpers import TinyLM
from tests.conftest import tiny_llama


def _state(module):
    """What must not change when a call fails: tensors (values), module types, requires_grad flags, hooks."""
    return (
        {k: v.clone() for k, v in module.state_dict().items()},
        [(n, type(m)) for n, m in module.named_modules()],
        {n: p.requires_grad for n, p in module.named_parameters()},
        sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules()),
    )


def _same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


# -- typed arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(use_rslora="no"), TypeError, r"LoRA: use_rslora='no' \(str\) must be True or False \(the string 'no' is not a bool: write False"),
        (dict(use_rslora="false"), TypeError, r"use_rslora='false'"),
        (dict(alpha=math.inf), ValueError, r"LoRA alpha must be a finite number > 0, got alpha=inf"),
        (dict(alpha=float("nan")), ValueError, r"LoRA alpha must be a finite number > 0, got alpha=nan"),
        (dict(dropout=-math.inf), ValueError, r"LoRA dropout must be in \[0, 1\), got dropout=-inf"),
        (dict(r=True), ValueError, r"LoRA rank r must be a positive integer, got r=True"),
        (dict(gate=1), TypeError, r"gate=1 \(int\) must be True or False"),
        (dict(init="xavier"), ValueError, r"LoRA init must be 'kaiming', 'gaussian', 'pissa', 'pissa_niter_K' .* or 'olora', got init='xavier'"),
        (dict(rank_pattern={"q_proj": 2.5}), ValueError, r"LoRA rank r must be a positive integer, got r=2.5"),
        (dict(rank_pattern={"q_proj": "4"}), ValueError, r"LoRA rank r must be a positive integer, got r='4'"),
        (dict(save_dir=3), TypeError, r"LoRA: save_dir=3 \(int\) must be a string or None"),
        (dict(target_modules=["q_proj", 3]), TypeError, r"target_modules=\['q_proj', 3\] \(list\) must be a string or a list of strings"),
    ],
)
def test_lora_arguments_are_checked_strictly(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRA(**kwargs)


def test_every_callback_checks_its_typed_arguments_and_keeps_its_signature():
    """The check is in the base class, so each method callback has it (and LightningCLI still sees the signature)."""
    checked = 0
    for name, cls in sorted(PEFTCallback._registry.items()):
        sig = inspect.signature(cls.__init__)
        assert "self" in sig.parameters and len(sig.parameters) > 1, name
        cls()  # the defaults pass
        bools = [p for p, v in sig.parameters.items() if v.annotation in (bool, "bool")]
        for p in bools:
            with pytest.raises(TypeError, match=rf"{cls.__name__}: {p}='yes' \(str\) must be True or False"):
                cls(**{p: "yes"})
            checked += 1
    assert checked >= 5


def test_a_yaml_infinity_is_refused_through_the_cli(minilm_path, monkeypatch, capsys):
    from lightning_peft.cli import main
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    with pytest.raises((ValueError, SystemExit)) as exc:
        main(["fit", "--config", "configs/quickstart.yaml", "--trainer.callbacks.init_args.alpha=.inf", "--trainer.fast_dev_run=1"])
    assert "LoRA alpha must be a finite number > 0, got alpha=inf" in str(exc.value) + capsys.readouterr().err


def test_functional_injection_refuses_infinite_alpha_and_string_flags():
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got alpha=inf"):
        inject_lora(model, ["q_proj"], alpha=math.inf)
    with pytest.raises(TypeError, match="use_rslora must be True or False, got 'no'"):
        inject_lora(model, ["q_proj"], use_rslora="no")
    _same(before, _state(model))


# -- adapter files ---------------------------------------------------------------------------------------------
def _lora_qv():
    """A tiny Llama with LoRA r=2 on q/v, B random so that the adapter changes the outputs."""
    model = tiny_llama()
    LoRA(r=2, alpha=4, target_modules=["q_proj", "v_proj"]).inject(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_()
    return model


def _saved(tmp_path):
    model = _lora_qv()
    save_adapter(model, tmp_path / "a")
    return model, tmp_path / "a"


def _edit_config(directory, **fields):
    path = directory / "adapter_config.json"
    text = json.dumps({**json.loads(path.read_text()), **fields})
    path.write_text(text.replace('"__INF__"', "Infinity"))


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"use_rslora": "false"}, r"field 'use_rslora' must be bool, found str 'false' \(a JSON string, not a JSON boolean"),
        ({"lora_alpha": "__INF__"}, r"holds Infinity, which is not a number an adapter config can use"),
        ({"lora_dropout": True}, r"field 'lora_dropout' must be int or float, found bool"),
        ({"fan_in_fan_out": 0}, r"field 'fan_in_fan_out' must be bool, found int"),
    ],
)
def test_config_fields_are_typed_strictly_and_finite(tmp_path, fields, match):
    _, d = _saved(tmp_path)
    _edit_config(d, **fields)
    fresh = tiny_llama()
    before = _state(fresh)
    with pytest.raises(AdapterFileError, match=match):
        load_adapter(fresh, d)
    _same(before, _state(fresh))


def _rewrite_tensors(directory, change):
    path = directory / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensors_are_refused(tmp_path, value):
    _, d = _saved(tmp_path)

    def poison(tensors, meta):
        key = sorted(tensors)[0]
        tensors[key][0, 0] = value
        meta.pop("lightning_peft_sha256")  # as a file from elsewhere: no digest to catch it first

    _rewrite_tensors(d, poison)
    fresh = tiny_llama()
    before = _state(fresh)
    with pytest.raises(AdapterFileError, match=r"hold NaN or infinite values"):
        load_adapter(fresh, d)
    _same(before, _state(fresh))


def test_a_flipped_byte_fails_the_integrity_digest(tmp_path):
    model, d = _saved(tmp_path)
    path = d / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes: still a valid file, a slightly different value
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="do not match the integrity digest"):
        load_adapter(tiny_llama(), d)
    # and an intact file loads, equal to what was saved
    save_adapter(model, tmp_path / "b")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path / "b")(input_ids=ids).logits, model(input_ids=ids).logits)


def test_tensors_renamed_to_another_module_fail_the_integrity_digest(tmp_path):
    """Same bytes, same shapes, same order, other names (q_proj's tensors relabelled k_proj): the digest covers the names."""
    _, d = _saved(tmp_path)

    def rename(tensors, meta):
        for key in [k for k in tensors if ".layers.0.self_attn.q_proj." in k]:
            tensors[key.replace("q_proj", "k_proj")] = tensors.pop(key)

    _rewrite_tensors(d, rename)
    with pytest.raises(AdapterFileError, match="do not match the integrity digest"):
        load_adapter(tiny_llama(), d)


def test_modules_to_save_without_its_tensors_is_an_error(tmp_path):
    model = tiny_llama()
    LoRA(r=2, alpha=4, target_modules=["q_proj"], trainable_modules=["lm_head"]).inject(model)
    save_adapter(model, tmp_path / "a")
    _rewrite_tensors(tmp_path / "a", lambda t, m: (t.pop("base_model.model.lm_head.weight"), m.pop("lightning_peft_sha256")))
    fresh = tiny_llama()
    before = _state(fresh)
    with pytest.raises(AdapterFileError, match=r"modules_to_save lists \['lm_head'\], but the file lacks 1 of their tensors \(lm_head.weight\)"):
        load_adapter(fresh, tmp_path / "a")
    _same(before, _state(fresh))


@pytest.mark.parametrize("name", ["default", "zz"])
def test_a_tensor_spelled_twice_is_an_error(tmp_path, name):
    """The file's keys are in name order: for adapter 'default' the named spelling (lora_A.default.weight) comes
    before the plain one (lora_A.weight); for 'zz' after it. Either order is refused."""
    _, d = _saved(tmp_path)

    def twice(tensors, meta):
        key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
        tensors[key.replace("lora_A.weight", f"lora_A.{name}.weight")] = tensors[key] + 1
        meta.pop("lightning_peft_sha256")

    _rewrite_tensors(d, twice)
    with pytest.raises(AdapterFileError, match=r"two spellings of the same tensor"):
        load_adapter(tiny_llama(), d, adapter_name=name)


# -- checkpoints -----------------------------------------------------------------------------------------------
def _checkpoint(**lora):
    module = TinyLM()
    LoRA(r=2, alpha=4, target_modules=["q_proj"], **lora).inject(module)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_b" in n:
                p.normal_()
    ckpt = {"state_dict": module.state_dict()}
    adapter_checkpoint_state(module, ckpt)
    return ckpt


def _wrong_shapes(ckpt):  # another base, or a tampered file
    ckpt["state_dict"] = {k: v[:1] for k, v in ckpt["state_dict"].items()}
    return "does not match this model's adapters"


def _infinite_value(ckpt):
    key = next(k for k in ckpt["state_dict"] if "lora_b" in k)
    ckpt["state_dict"][key][0, 0] = float("inf")
    return rf"{key}: holds NaN or infinite values"


def _unknown_method(ckpt):
    ckpt["lightning_peft"]["methods"][0]["method"] = "dora"
    return r"records an adapter of method 'dora', which this lightning-peft does not have \(known: \["


@pytest.mark.parametrize("tamper", [_wrong_shapes, _infinite_value, _unknown_method])
def test_a_bad_checkpoint_is_refused_and_leaves_the_module_as_it_was(tamper):
    """A checkpoint that does not fit (shapes), holds non-finite adapter values, or records an unknown method is
    refused with a message naming it, and the module keeps no adapter injected for it."""
    ckpt = _checkpoint()
    match = tamper(ckpt)
    module = TinyLM()
    before = _state(module)
    with pytest.raises(ValueError, match=match):
        load_adapter_checkpoint(module, ckpt)
    _same(before, _state(module))
    assert not any("lora" in n for n, _ in module.named_modules())


def test_a_good_checkpoint_still_loads_exactly():
    ckpt = _checkpoint()
    module = load_adapter_checkpoint(TinyLM(), ckpt)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(module.state_dict()[k], v), k


# -- typos are errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_modules=["q_proj", "v_prj"]), r"target_modules entries \['v_prj'\] match no module of LlamaForCausalLM \(a typo\?\).*Candidate module names: \[.*v_proj"),
        (dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_prj"]), r"exclude_modules entries \['gate_prj'\] match no module"),
        (dict(target_modules=["q_proj"], trainable_modules=["lm_head", "lm_haed"]), r"trainable_modules entries \['lm_haed'\] match no module of LlamaForCausalLM \(a typo\?\)"),
        (dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_prj": 4}), r"rank_pattern key 'v_prj' matches none of the adapted modules \(a typo\?\)"),
        (dict(target_modules=["q_proj"], alpha_pattern={"q_proj(": 4.0}), r"alpha_pattern key 'q_proj\(' is not a valid regular expression"),
        # peft applies a key to names ending with it at a dot: "proj" selects neither q_proj nor v_proj
        (dict(target_modules=["q_proj", "v_proj"], rank_pattern={"proj": 4}), r"rank_pattern key 'proj' matches none of the adapted modules"),
    ],
)
def test_every_entry_and_pattern_key_must_match(kwargs, match):
    """["query", "valeu"] adapted query only, silently: each entry of a list and each pattern key must match."""
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        LoRA(r=2, alpha=4, **kwargs).inject(model)
    _same(before, _state(model))


def test_trainable_modules_entries_may_each_match_different_modules():
    model = tiny_llama()
    LoRA(r=2, alpha=4, target_modules=["q_proj"], trainable_modules=["lm_head", "embed_tokens"]).inject(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained == {"lm_head.weight", "model.embed_tokens.weight"}


def test_every_target_entry_must_match_for_ia3_too():
    from lightning_peft import IA3

    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=r"target_modules entries \['v_prj'\] match no module of LlamaForCausalLM \(a typo\?\)"):
        IA3(target_modules=["q_proj", "v_prj"], feedforward_modules=[]).inject(model)
    _same(before, _state(model))


def test_a_peft_file_may_list_targets_the_model_does_not_have(tmp_path):
    """Files written elsewhere are read as peft reads them: a listed name the model lacks is not an error."""
    model, d = _saved(tmp_path)
    _edit_config(d, target_modules=["q_proj", "v_proj", "not_in_llama"])
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(load_adapter(tiny_llama(), d, check_integrity=False)(input_ids=ids).logits, model(input_ids=ids).logits)


# -- no lost work ---------------------------------------------------------------------------------------------
def test_an_unwritable_save_dir_fails_at_setup_before_any_training(tmp_path):
    import lightning as L

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    module = TinyLM()
    steps = []
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LoRA(r=2, alpha=4, target_modules=["q_proj"], save_dir=str(blocker / "adapter")),
                                   L.Callback()], default_root_dir=tmp_path)
    trainer.callbacks[-1].on_train_batch_end = lambda *a, **k: steps.append(1)
    with pytest.raises(NotADirectoryError, match=r"LoRA\(save_dir=...\): .*a_file \(on the way to .*adapter\) is a file"):
        trainer.fit(module)
    assert steps == []  # refused before the first step, not after the whole run


def test_save_dir_expands_the_home_folder(monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.setenv("HOME", str(tmp_path))
    assert LoRA(save_dir="~/adapters/x").save_dir == str(tmp_path / "adapters" / "x")
    assert LoRA(save_dir=Path("out")).save_dir == "out"  # a Path is accepted as a string


# -- no silent no-ops ------------------------------------------------------------------------------------------
def test_training_a_merged_model_is_refused_with_the_fix(tmp_path):
    import lightning as L

    from lightning_peft import merge_adapters, unmerge_adapters

    module = TinyLM()
    lora = LoRA(r=2, alpha=4, target_modules=["q_proj"])
    lora.inject(module)
    merge_adapters(module)

    def trainer():
        return L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[lora], default_root_dir=tmp_path)

    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"merged into the base weights .* Call lightning_peft.unmerge_adapters\(model\) before fit"):
        trainer().fit(module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    unmerge_adapters(module)
    trainer().fit(module)  # unmerged: it trains
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items() if "lora_" in k)


def test_training_a_merged_ia3_model_is_refused(tmp_path):
    """(IA)3 layers hold one unnamed adapter: merged and trainable, it would learn nothing either."""
    import lightning as L

    from lightning_peft import IA3, merge_adapters

    module = TinyLM()
    ia3 = IA3(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    ia3.inject(module)
    merge_adapters(module)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ia3], default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"merged into the base weights .* Call lightning_peft.unmerge_adapters\(model\) before fit"):
        trainer.fit(module)


def test_training_a_new_adapter_on_top_of_a_merged_frozen_one_is_allowed(tmp_path):
    import lightning as L

    from lightning_peft import merge_adapters

    module = TinyLM()
    LoRA(r=2, alpha=4, target_modules=["q_proj"]).inject(module)
    merge_adapters(module)
    for m in module.modules():
        if hasattr(m, "frozen"):
            m.frozen.add("default")
    new = LoRA(r=2, alpha=4, target_modules=["q_proj"], adapter_name="b")
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[new], default_root_dir=tmp_path).fit(module)


# -- a failed call leaves everything as it was -------------------------------------------------------------------
def test_merge_adapters_with_an_unmergeable_layer_merges_nothing():
    """LoRA + Houlsby: LoRA was merged, then Houlsby raised: a half-merged model. Every layer is checked first."""
    from lightning_peft import Houlsby, merge_adapters

    model = tiny_llama()
    LoRA(r=2, alpha=4, target_modules=["q_proj"]).inject(model)
    Houlsby(bottleneck_size=4).inject(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_()
    before = _state(model)
    with pytest.raises(NotImplementedError, match=r"(?s)merge_adapters: nothing was merged, 4 adapter layer\(s\) cannot be:.*HoulsbyAdapter cannot be merged"):
        merge_adapters(model)
    _same(before, _state(model))
    assert not any(getattr(m, "merged", False) for m in model.modules())


def _lora_with_a_bad_last_layer(fault: str):
    """LoRA on q/v with random B; the last v_proj's adapter is broken: ``"overflow"`` (finite values whose update
    overflows, found only while merging) or ``"nan"`` (found up front)."""
    model = _lora_qv()
    with torch.no_grad():
        last = [m for n, m in model.named_modules() if n.endswith("v_proj")][-1]
        if fault == "overflow":
            last.lora_b["default"].fill_(3e38)
            last.lora_a["default"].fill_(3e38)
        else:
            last.lora_b["default"][0, 0] = float("nan")
    return model


def test_a_merge_that_fails_midway_is_rolled_back():
    from lightning_peft import merge_adapters

    model = _lora_with_a_bad_last_layer("overflow")  # the last layer's merge refuses, after the earlier ones merged
    before = _state(model)
    with pytest.raises(ValueError, match="would write NaN/inf into the base weight"):
        merge_adapters(model)
    after = _state(model)
    for k in before[0]:
        torch.testing.assert_close(after[0][k], before[0][k], atol=1e-6, rtol=0)  # unmerge rounds in float32
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_an_ia3_merge_that_fails_midway_is_rolled_back():
    """(IA)3 layers have no named adapters: the rollback must unmerge them on their merged flag alone."""
    from lightning_peft import IA3, merge_adapters

    model = tiny_llama()
    IA3(target_modules=["q_proj", "v_proj"], feedforward_modules=[]).inject(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5)
        last = [m for n, m in model.named_modules() if n.endswith("v_proj")][-1]
        last.ia3_l[0] = 0.0  # the last layer's merge refuses (a scale of 0 could not be undone): earlier ones were merged
    before = _state(model)
    with pytest.raises(ValueError, match="could not be undone"):
        merge_adapters(model)
    after = _state(model)
    for k in before[0]:
        torch.testing.assert_close(after[0][k], before[0][k], atol=1e-6, rtol=0)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_a_save_interrupted_while_writing_the_weights_leaves_the_previous_adapter_loadable(tmp_path, monkeypatch):
    """The weights go to a temporary file renamed into place, before the config: a crash while they are written
    leaves the previous pair intact (not a half-written weights file, nor a new config beside old weights)."""
    import lightning_peft.io as io

    model, d = _saved(tmp_path)
    other = tiny_llama()
    LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]).inject(other)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 16)  # part of the file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(OSError, match="No space left on device"):
        save_adapter(other, d)
    monkeypatch.undo()
    assert not list(d.glob(".*.tmp"))  # no temporary file left behind
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(load_adapter(tiny_llama(), d)(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_torn_save_is_refused_and_an_edited_config_needs_the_opt_in(tmp_path):
    """Weights and config are each written via a temporary file and a rename, the config last; the weights record
    the config's digest, so new weights beside an old config (a save interrupted between the two) do not load."""
    model, d = _saved(tmp_path)
    old_config = (d / "adapter_config.json").read_text()
    other = tiny_llama()
    LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]).inject(other)
    save_adapter(other, d)  # a second save over the first ...
    (d / "adapter_config.json").write_text(old_config)  # ... whose config write never happened
    with pytest.raises(AdapterFileError, match=r"adapter_config.json is not the config that was saved with adapter_model.safetensors"):
        load_adapter(tiny_llama(), d)
    assert not list(d.glob(".*.tmp"))  # no temporary files left behind


def test_saving_over_another_adapter_warns_and_stale_sub_adapters_go(tmp_path):
    from lightning_peft import IA3, delete_adapter

    model, d = _saved(tmp_path)
    other = tiny_llama()
    IA3().inject(other)
    with pytest.warns(UserWarning, match=r"held another adapter \(peft_type='LORA'.*it is replaced"):
        save_adapter(other, d)
    two = tiny_llama()
    LoRA(r=2, alpha=4, target_modules=["q_proj"]).inject(two)
    LoRA(r=2, alpha=4, target_modules=["q_proj"], adapter_name="b").inject(two)
    save_adapter(two, tmp_path / "two")
    assert (tmp_path / "two" / "b" / "adapter_config.json").is_file()
    delete_adapter(two, "b")
    with pytest.warns(UserWarning, match=r"Removed .*two/b: a saved adapter 'b' that this model no longer carries"):
        save_adapter(two, tmp_path / "two")
    assert not (tmp_path / "two" / "b").exists()


def test_saving_over_an_adapter_with_other_targets_warns_and_saving_the_same_again_does_not(tmp_path):
    import warnings

    model, d = _saved(tmp_path)  # LoRA on q_proj and v_proj
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, d)  # the same adapter again: nothing is replaced
    other = tiny_llama()
    LoRA(r=2, alpha=4, target_modules=["q_proj"]).inject(other)
    with pytest.warns(UserWarning, match=r"held another adapter \(target_modules=\[.*v_proj.*\]\); it is replaced"):
        save_adapter(other, d)


def test_saving_one_named_adapter_keeps_the_other_adapters_folders(tmp_path):
    import warnings

    two = tiny_llama()
    LoRA(r=2, alpha=4, target_modules=["q_proj"]).inject(two)
    LoRA(r=2, alpha=4, target_modules=["q_proj"], adapter_name="b").inject(two)
    save_adapter(two, tmp_path / "two")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(two, tmp_path / "two", adapter_name="default")  # only "default" is rewritten
    assert (tmp_path / "two" / "b" / "adapter_config.json").is_file()


# -- raw errors become clear ones ---------------------------------------------------------------------------------
def test_a_path_to_the_weights_file_names_the_directory_to_pass(tmp_path):
    _, d = _saved(tmp_path)
    with pytest.raises(AdapterFileError, match=rf"adapter_model.safetensors is a file; an adapter is a directory .* pass {d}"):
        load_adapter(tiny_llama(), d / "adapter_model.safetensors")


def test_malformed_fingerprint_metadata_is_a_clear_error(tmp_path):
    _, d = _saved(tmp_path)

    def mangle(tensors, meta):
        meta["lightning_peft_base"] = "{not json"

    _rewrite_tensors(d, mangle)
    with pytest.raises(AdapterFileError, match=r"the base fingerprint in its header is malformed"):
        load_adapter(tiny_llama(), d)


def test_a_non_finite_adapter_is_refused_before_anything_merges():
    """NaN/inf adapter values are found up front (merge_problem): no layer is merged, so nothing needs rounding back."""
    from lightning_peft import merge_adapters

    model = _lora_with_a_bad_last_layer("nan")
    before = _state(model)
    with pytest.raises(ValueError, match=r"(?s)nothing was merged, 1 adapter layer.*v_proj: adapter parameter\(s\) \['lora_b.default'\] hold NaN/inf"):
        merge_adapters(model)
    after = _state(model)
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0] if "lora_b" not in k)  # bitwise: nothing merged
    assert not any(getattr(m, "merged", False) for m in model.modules())
