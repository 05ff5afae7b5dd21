"""The import layering of DESIGN.md, checked on the source so it cannot regress.

Every `import` of every module under src/seekformer is read with `ast` -- module level and inside functions
(a lazy import is still a dependency), but not under `if TYPE_CHECKING:` -- and checked against LAYERS:
a module imports only from its own package or from lower layers; packages on the same layer only along
SIDEWAYS; `nn` only from `config` and `errors` (it touches no files); no import cycles between modules;
no private (`_name`) imported from another module; no module reads another module's source.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import seekformer

ROOT = Path(seekformer.__file__).resolve().parent

# Lower number = lower layer. A top-level module or package not listed fails the test: place it.
LAYERS = {
    "errors": 0, "recipes": 0, "lazy": 0,  # recipes: builtin YAML files only
    "config": 1, "fsio": 1, "runtime": 1, "chat_template": 1, "figures": 1,
    "data": 2,            # reads text and task files; takes a tokenizer object, never imports tokenizer
    "tokenizer": 3,
    "model_card": 3,      # a saved model's README.md (metadata only)
    "checkpoint": 4,
    "nn": 5,
    "models": 6,
    "distributed": 7,
    "training": 8, "inference": 8, "evaluation": 8, "compress": 8, "interpret": 8,
    "serving": 9,
    "bench": 10,
    "cli": 11, "__main__": 12,
}
# Same-layer imports that the design allows (importer -> imported).
SIDEWAYS = {
    ("training", "evaluation"),   # fine-tuning evaluates its task heads
    ("evaluation", "inference"),  # generation tasks and scoring decode with the model
    ("compress", "training"),     # distillation plugs a loss into the shared training loop
    ("compress", "evaluation"),
    ("compress", "inference"),
    ("interpret", "inference"),
    ("interpret", "evaluation"),  # corpus statistics read text the way perplexity evaluation does
}
# The one declared upward import: SeekForCausalLM.generate calls into inference (as GenerationMixin does).
UPWARD = {("seekformer.models.causal_lm", "inference"),
          ("seekformer.models.vision_lm", "inference")}  # the vision LM's generate: the same exception
NN_MAY_IMPORT = {"nn", "config", "errors"}
# Cycles that exist today and are being removed; an entry that no longer exists must be deleted here.
KNOWN_CYCLES: list[set[str]] = []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(dotted: str) -> bool:
    p = ROOT.parent / dotted.replace(".", "/")
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


@lru_cache(maxsize=1)
def imports() -> tuple[tuple[str, str, str, int], ...]:
    """(importer module, imported module, imported name or '', line) for every seekformer import."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hidden = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                  ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.Import):
                out += [(mod, a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "seekformer"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "seekformer":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    out.append((mod, sub, "", node.lineno) if _exists(sub) else (mod, target, a.name, node.lineno))
    return tuple(out)


def top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer():
    missing = sorted({top(m) for m, *_ in imports() if top(m) and top(m) not in LAYERS}
                     | {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
                        if (p.suffix == ".py" and p.stem != "__init__" or (p / "__init__.py").is_file())
                        and (p.stem if p.is_file() else p.name) not in LAYERS})
    assert not missing, f"place these in LAYERS (tests/test_layers.py) and DESIGN.md: {missing}"


def test_imports_point_down():
    bad = []
    for mod, target, _, line in imports():
        a, b = top(mod), top(target)
        if not a or not b or a == b or a not in LAYERS or b not in LAYERS:
            continue
        if (mod, b) in UPWARD or (a, b) in SIDEWAYS:
            continue
        if LAYERS[b] >= LAYERS[a]:
            bad.append(f"{mod}:{line} imports {target} ({a} is layer {LAYERS[a]}, {b} layer {LAYERS[b]})")
    assert not bad, "imports that do not point down:\n" + "\n".join(bad)


def test_nn_imports_only_config_and_errors():
    bad = [f"{m}:{line} imports {t}" for m, t, _, line in imports() if top(m) == "nn" and top(t) not in NN_MAY_IMPORT]
    assert not bad, "\n".join(bad)


def _cycles() -> list[set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, target, _, _ in imports():
        if mod != target and not mod.startswith(target + "."):  # a submodule importing its package's __init__
            graph[mod].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(set(graph) | {t for ts in graph.values() for t in ts}):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = _cycles()
    new = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not new, f"import cycles: {new}"
    assert not gone, f"these cycles are gone: delete them from KNOWN_CYCLES: {gone}"


def test_no_private_names_across_modules():
    bad = [f"{m}:{line} imports {t}.{name}" for m, t, name, line in imports()
           if name.startswith("_") and not name.startswith("__") and t != m]
    assert not bad, "use a public name (or move the helper where both can use it):\n" + "\n".join(bad)


# A decorator may read the signature of the function it decorates (it builds a typer command from it).
SIGNATURE_OF_OWN_ARGUMENT = {"seekformer.cli.options"}


def test_no_module_reads_another_modules_source():
    bad = []
    for path in ROOT.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for needle in ("inspect.getsource", "find_spec(", "inspect.signature("):
            if needle in text and not (needle == "inspect.signature(" and module_name(path) in SIGNATURE_OF_OWN_ARGUMENT):
                bad.append(f"{module_name(path)} uses {needle}")
    assert not bad, "\n".join(bad)


def test_import_seekformer_changes_no_environment():
    import os
    import subprocess
    import sys

    code = "import os; before = dict(os.environ); import seekformer, seekformer.cli; print(before == dict(os.environ))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "True", out.stderr


def test_architecture_doc_lists_every_layer():
    """docs/architecture.md's table names every top-level module of LAYERS on its layer's row."""
    doc = (ROOT.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            rows[int(cells[0])] = cells[1]
    wrong = [f"{name} (layer {n})" for name, n in LAYERS.items() if f"`{name}`" not in rows.get(n, "")]
    assert not wrong, f"docs/architecture.md: put these on their layer's row: {wrong}"
