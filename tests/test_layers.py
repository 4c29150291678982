"""Layers point down (issue 23, point 5): the pure-PyTorch layers load neither Lightning nor transformers, and no
module of the package imports, even inside a function, one that imports it back."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_peft

PACKAGE = Path(lightning_peft.__file__).parent
#: the layers under the Lightning glue: pure PyTorch (+ safetensors for the file format)
LOWER = ("lightning_peft.core", "lightning_peft.module_copies", "lightning_peft.io", "lightning_peft.compat", "lightning_peft.targeting", "lightning_peft.quant",
         "lightning_peft.validation", "lightning_peft.methods", "lightning_peft.distributed")
UPPER = ("lightning_peft.callbacks", "lightning_peft.mixin", "lightning_peft.plugins", "lightning_peft.tasks", "lightning_peft.cli", "lightning_peft.run_config", "lightning_peft.generate",
         "lightning_peft.bench")


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports, at any depth (function-local imports too), except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return found - {name}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_pure_layers_load_neither_lightning_nor_transformers():
    methods = sorted(n for n in _modules() if n.startswith("lightning_peft.methods."))
    names = ["lightning_peft.core", "lightning_peft.io", "lightning_peft.distributed", *methods]
    code = f"import importlib, json, sys\nfor n in {names!r}:\n    importlib.import_module(n)\n" \
           "print(json.dumps(sorted(m for m in ('lightning', 'lightning.pytorch', 'transformers') if m in sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert loaded == [], f"importing {len(names)} pure-PyTorch modules loaded {loaded}"
    assert len(methods) >= 17


def test_the_package_has_no_import_cycle_even_through_local_imports():
    graph = _graph()
    cycles, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if v not in graph:
                continue
            if state.get(v) == "open":
                cycles.append(" -> ".join([*stack[stack.index(v):], v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, cycles


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_import_nothing_from_the_lightning_layer(layer):
    graph = _graph()
    up = {f"{name} imports {dep}" for name, deps in graph.items() if name == layer or name.startswith(layer + ".")
          for dep in deps if dep.startswith(UPPER) or dep == "lightning" or dep.startswith("lightning.")}
    assert not up, sorted(up)


def test_every_public_name_resolves_lazily():
    code = "import sys, lightning_peft as lp\nassert 'lightning' not in sys.modules\n" \
           "assert all(getattr(lp, n) is not None for n in lp.__all__) and set(lp.__all__) <= set(dir(lp))\nprint('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "ok"
    with pytest.raises(AttributeError, match="module 'lightning_peft' has no attribute 'LoRa'"):
        lightning_peft.LoRa  # noqa: B018


def test_the_multi_adapter_state_changes_only_through_the_protocol():
    """``active``/``frozen``/``merged_adapters``/``sample_adapters`` are declared by core.NamedAdapters and changed only
    by the core functions and the layers themselves (issue 23, point 3): io once edited them directly."""
    state = {"active", "frozen", "merged_adapters", "sample_adapters"}
    allowed = {"lightning_peft.core", "lightning_peft.methods.lora", "lightning_peft.module_copies"}
    writes = []
    for name, path in _modules().items():
        if name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            writes += [f"{name}: {ast.unparse(t)} = ..." for t in targets if isinstance(t, ast.Attribute) and t.attr in state]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Attribute) \
                    and node.func.value.attr in state and node.func.attr in {"add", "discard", "append", "remove", "clear", "pop"}:
                writes.append(f"{name}: {ast.unparse(node)}")
    assert not writes, writes
