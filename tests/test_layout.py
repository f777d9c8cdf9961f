"""The package's shape: the folders are its layers, imports only point down (no circles), each
hand-written module holds one idea (at most 400 lines), and the command line starts light."""

import ast
import subprocess
import sys
from pathlib import Path

import helpers
from helpers.run.export import HEADER

PACKAGE = Path(helpers.__file__).parent
# bottom to top; a module may import its own layer and the layers below it, never one above
LAYERS = {"foundation": 0, "data": 1, "sae": 2, "analysis": 3, "show": 4, "run": 5, "cli": 6}
FOUNDATION = {"config", "files", "progress", "distributed", "numba_threads", "allocator"}  # at the root: every layer may use them
TOP = {"cli", "__main__"}


def module_names() -> dict[str, Path]:
    """'data.store' -> its file, for every module of the package (package __init__s as their folder)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def layer(module: str) -> str:
    head = module.split(".")[0]
    if module in FOUNDATION or module == "":
        return "foundation"
    if module in TOP:
        return "cli"
    assert head in LAYERS, f"helpers/{module.replace('.', '/')}.py is in no layer; put it in one of {list(LAYERS)}"
    return head


def import_graph() -> dict[str, set[str]]:
    """module -> the helpers modules it imports (at the top or inside functions)."""
    names = module_names()
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                    module = ".".join([*base, *(node.module.split(".") if node.module else [])]).strip(".")
                elif node.module and (node.module == "helpers" or node.module.startswith("helpers.")):
                    module = node.module.removeprefix("helpers").strip(".")
                else:
                    continue
                for alias in node.names:  # "from helpers.sae import model" imports the module helpers.sae.model
                    sub = f"{module}.{alias.name}".strip(".")
                    deps.add(sub if sub in names else module)
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("helpers.") for a in node.names if a.name.startswith("helpers.")}
        graph[name] = {d for d in deps if d in names and d != name and d != ""}
    return graph


def generated(path: Path) -> bool:
    return path.read_text().startswith(HEADER.split("{")[0])


def test_every_module_is_in_a_layer():
    for name in module_names():
        layer(name)


def test_imports_only_point_down():
    wrong = [f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, deps in import_graph().items() for d in deps
             if LAYERS[layer(d)] > LAYERS[layer(m)]]
    assert wrong == [], "a lower layer imports a higher one:\n" + "\n".join(wrong)


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


def test_the_sae_itself_knows_no_network_and_no_store():
    """The SAE's equation, model and kernels work on any vectors: only training reads a harvest."""
    graph = import_graph()
    general = ["sae.model", "sae.kernels", "sae.screened_topk", "sae.loss"]
    for module in general:
        assert {layer(d) for d in graph[module]} <= {"foundation", "sae"}, (module, graph[module])
        assert graph[module] <= {*general, *FOUNDATION}, (module, graph[module])


def test_one_idea_per_module():
    long = {name: n for name, path in module_names().items()
            if not generated(path) and (n := len(path.read_text().splitlines())) > 400}
    assert long == {}, f"hand-written modules over 400 lines (usually two ideas): {long}"


def test_help_imports_no_torch():
    code = "import sys; from helpers.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"
