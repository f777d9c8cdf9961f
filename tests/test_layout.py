"""The package's shape: imports only point down (no circles), and the command line starts light."""

import ast
import subprocess
import sys
from pathlib import Path

import helpers

PACKAGE = Path(helpers.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """module -> the helpers modules it imports, at the top or inside functions."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        name, deps = path.stem, set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
                elif node.module and node.module.startswith("helpers."):
                    deps.add(node.module.split(".")[1])
                elif node.module == "helpers":
                    deps |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("helpers.")}
        graph[name] = {d for d in deps if (PACKAGE / f"{d}.py").exists() and d != name}
    return graph


def test_imports_have_no_circles():
    graph, state, cycle = import_graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle.append(path + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycle == [], f"import circles: {cycle}"


def test_only_the_top_knows_run_directories():
    graph = import_graph()
    users = {m for m, deps in graph.items() if "runs" in deps}
    assert users == set(), f"{users} reach up to runs, the layer that drives them"
    assert "runs" not in graph["dashboard"] and "sae" not in graph["kernels"] | graph["screened_topk"]
    below_sae = {"config", "files", "kernels", "screened_topk"}
    assert graph["sae"] <= below_sae, graph["sae"]  # a general TopK SAE: no InceptionV1, no store


def test_help_imports_no_torch():
    code = "import sys; from helpers.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"
