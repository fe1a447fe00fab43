"""The package's import graph runs one way (README "Layout"): data -> refactor -> train -> serve.

Read statically, so imports inside functions count too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pregate"

SERVING = (
    "engine",
    "engine_loop",
    "heap",
    "server",
    "launch",
    "http_timeouts",
    "protocol",
    "detokenize",
    "loadtest",
    "store",
    "scheduler",
    "eviction",
    "metrics",
    "router",
    "moe",
    "quantize",
    "packed",
    "native",
    "native_layout",
    "native_router",
    "checkpoint",
)
TRAINING = ("train", "distill", "refactor", "data", "corpora", "stats", "evaluate", "harness", "tasks")
SIMULATOR = ("sim", "cache_bench", "references", "demo_serving")
BOTTOM = ("errors", "checkpoint", "packages", "scheduler", "eviction", "metrics", "workload")


def package_imports(module: str) -> set[str]:
    """The pregate modules `module` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pregate"):
            if node.module == "pregate":
                found |= {a.name for a in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pregate.")}
    found.discard(module)
    return found


@pytest.mark.parametrize("module", SERVING)
def test_serving_imports_no_training_and_no_simulator(module):
    assert not package_imports(module) & set(TRAINING + SIMULATOR)


@pytest.mark.parametrize("module", BOTTOM)
def test_bottom_modules_import_only_bottom_modules(module):
    assert package_imports(module) <= set(BOTTOM), package_imports(module)


def test_every_module_is_placed():
    """A new module must be placed in the graph (here and in README's Layout) before it lands."""
    placed = set(SERVING + TRAINING + SIMULATOR + BOTTOM) | {
        "__init__",
        "analyze",
        "bench",
        "bench_step",
        "llama_reference",
        "memory_bench",
        "roofline",
        "demo",
        "export",
        "hub",
        "plots",
        "configuration_pregate",
        "modeling_pregate",
    }
    assert {p.stem for p in PACKAGE.glob("*.py")} == placed
