"""The architecture as a contract: every module imports only modules of lower layers, and
inference, benchmarks and experiments' summaries never load the training loop."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Lowest first; README "Layout" draws the same picture. A module may import modules of lower
# layers only (the data package's own modules may also import each other).
LAYERS = [
    ["errors"],
    ["storage"],
    ["task_types", "optim", "plots", "train_log", "models.ffn", "flops", "hlo"],
    ["models.t5", "scoring", "checkpoint", "sharding", "cli", "data", "artifact_format"],
    ["models.mta", "models.moe", "models.adapters", "hf", "decoding", "torch"],
    ["build", "step", "evaluation", "artifact"],
    ["train", "predict", "compile"],
    ["main", "experiments.summary", "export"],
    ["experiments.compare"],
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT / "mta_jax").with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _rank(module: str) -> int:
    """The layer of `module` (a name below mta_jax); sub-modules of `data` share its layer."""
    while module not in RANK:
        assert "." in module, f"mta_jax.{module} is in no layer of tests/unit/test_layout.py"
        module = module.rsplit(".", 1)[0]
    return RANK[module]


def _imports(path: pathlib.Path) -> set[str]:
    """mta_jax modules `path` imports (names below mta_jax), at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mta_jax"):
            base = node.module[len("mta_jax."):] if node.module != "mta_jax" else ""
            for alias in node.names:
                sub = f"{base}.{alias.name}".strip(".")
                # `from mta_jax.models import mta` imports a module; `from mta_jax.x import f` x.
                out.add(sub if (ROOT / "mta_jax" / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (ROOT / "mta_jax" / sub.replace(".", "/")).is_dir() else base)
        elif isinstance(node, ast.Import):
            out.update(a.name[len("mta_jax."):] for a in node.names if a.name.startswith("mta_jax."))
    return {m for m in out if m}


MODULES = sorted(p for p in (ROOT / "mta_jax").rglob("*.py")
                 if p.name != "__init__.py" or p.parent.name == "data")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_no_module_imports_a_module_above_it(path):
    name = _module_name(path)
    mine = _rank(name)
    for dep in _imports(path):
        same_package = name.startswith("data") and dep.startswith("data")
        assert _rank(dep) < mine or same_package, (
            f"mta_jax.{name} (layer {mine}) imports mta_jax.{dep} (layer {_rank(dep)})")


def test_every_module_has_a_layer():
    for path in MODULES:
        _rank(_module_name(path))


@pytest.mark.parametrize("entry", ["mta_jax.predict", "mta_jax.export", "mta_jax.build",
                                   "mta_jax.evaluation",
                                   "benchmarks.run", "benchmarks.gpu", "benchmarks.workloads",
                                   "mta_jax.experiments.summary"])
@pytest.mark.slow  # over 3 s on 2 cores
def test_inference_and_benchmarks_do_not_load_the_training_loop(entry):
    code = f"import sys, {entry}; print('mta_jax.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", f"importing {entry} loads mta_jax.train"
