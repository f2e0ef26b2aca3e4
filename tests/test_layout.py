"""The house rules, checked on the source: who may import whom, no import cycles, short files, and the backend
interface as the only seam between the entry points and the two backends."""
import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("engine", "models", "kernels", "examples")
ENTRY_POINTS = {"engine/train.py", "engine/make_pairs.py", "engine/infer.py", "engine/evaluate.py",
                "engine/encode_real.py"}
MAX_LINES = 320  # "about 300"


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module this file imports, at any depth of the file (lazy imports count too)."""
    tree = ast.parse(path.read_text())
    pkg = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x` names a module
    return out


def _graph():
    mods = {_module(p): p for p in _sources()}
    return mods, {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_no_import_cycles():
    mods, g = _graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(mods):
        if m not in state:
            visit(m)


def test_boundaries():
    mods, _ = _graph()
    for m, path in mods.items():
        imps = _imports(path)
        top = {i.split(".")[0] for i in imps}
        rel = path.relative_to(ROOT).as_posix()
        if m.startswith("models"):
            assert not top & {"engine", "deepspeed", "examples", "bench"}, f"{rel} imports {top & {'engine', 'deepspeed'}}"
        if m.startswith("kernels"):
            assert top <= {"__future__", "torch", "triton", "kernels"}, f"{rel} imports {top}"
        if m.startswith("engine") and rel not in ENTRY_POINTS:
            assert not top & {"examples", "bench"}, f"the engine library module {rel} imports an example or benchmark"
            assert "engine.cli" not in imps, f"the library module {rel} imports the CLI module"


def test_files_are_short():
    long = {p.relative_to(ROOT).as_posix(): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("path", sorted(ENTRY_POINTS | {"engine/checkpoint.py", "engine/trainer.py"}))
def test_no_backend_probes_outside_the_backends(path):
    """The entry points, checkpointing and the trainer use the backend interface, never probe for a backend."""
    text = (ROOT / path).read_text()
    for probe in ("isinstance(models", "hasattr(models", "hasattr(self.m", "getattr(models", "isinstance(self.m"):
        assert probe not in text, f"{path}: {probe}"


def test_backends_implement_the_whole_interface():
    from engine.backend import Backend
    from engine.plain import PlainBackend
    abstract = set(Backend.__abstractmethods__)
    assert abstract >= {"backward", "discard", "lrs", "save_checkpoint", "load_checkpoint"}
    assert not PlainBackend.__abstractmethods__
    zero = (ROOT / "engine/zero.py").read_text()  # deepspeed may be missing: read its methods from the source
    defined = {n.name for n in ast.walk(ast.parse(zero)) if isinstance(n, ast.FunctionDef)}
    assert abstract <= defined, f"ZeroBackend lacks {abstract - defined}"


def test_model_kind_is_decided_in_one_place():
    """Only engine/kinds.py compares model.kind to a name; everything else asks the registry."""
    for p in _sources():
        text = p.read_text()
        rel = p.relative_to(ROOT).as_posix()
        if rel != "engine/kinds.py":
            for kind in ('"unet"', '"sd15"', '"toy2d"'):
                assert f"kind == {kind}" not in text and f"kind != {kind}" not in text, f"{rel} tests {kind}"
                assert "kind in (" not in text and "kind not in (" not in text, f"{rel} tests model.kind"
