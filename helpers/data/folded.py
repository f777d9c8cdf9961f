"""Lucent's InceptionV1 with the -inf padding before each max pool given to the pool instead.

Lucent's ``forward`` pads before every 3x3 max pool: ``t_pad = F.pad(t, sides, value=float('-inf'))``, then
``self.pool(t_pad, kernel_size=(3, 3), ...)``. With a gradient wanted, that copy of the pool's input (the first one is
8 x 64 x 125 x 125 floats in a feature-visualisation step of 8 images), its filling and its backward's copy cost about
as much as the pool itself. ``fold_pool_pads_`` rewrites the forward's source (as ``suffix`` reads it): each such
pair becomes ``self.pool(t, kernel_size=(3, 3), ..., pad=sides)``, and ``pools.MaxPool2dLayer`` hands the sides to
its Numba kernels (with a gradient wanted and without), which read the padded entries as -inf without making them:
the same numbers, forward and backward, bit for bit (tests/test_featviz.py and tests/test_inception.py compare the
whole network with Lucent's own). Off the CPU the pool pads as before. Zero pads before convolutions are left
alone: a convolution with its padding built in gave the same numbers but no faster whole pass here (bench/README).
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
from collections import Counter

from torch import nn


def forward_tree(cls: type) -> ast.FunctionDef:
    """``cls.forward`` as a syntax tree: the rewritten one for a class ``fold_pool_pads_`` made."""
    source = getattr(cls, "forward_source", None) or textwrap.dedent(inspect.getsource(cls.forward))
    return ast.parse(source).body[0]


def compile_in_module(cls: type, function: ast.FunctionDef, filename: str):
    """``function`` (a syntax tree) compiled in the namespace of ``cls``'s module: the functions it calls are those
    ``cls.forward`` calls, patched ones included."""
    code = compile(ast.fix_missing_locations(ast.Module([function], type_ignores=[])), filename, "exec")
    namespace: dict = {}
    exec(code, vars(sys.modules[cls.__module__]), namespace)
    return namespace[function.name]


def _inf_pad(stmt) -> tuple[str, ast.expr, ast.expr] | None:
    """``t = F.pad(s, sides, value=float('-inf'))`` -> (t, s, sides)."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        return None
    call = stmt.value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "pad"
            and isinstance(call.func.value, ast.Name) and call.func.value.id == "F" and len(call.args) == 2
            and isinstance(call.args[0], ast.Name) and isinstance(call.args[1], ast.Tuple)
            and all(isinstance(e, ast.Constant) and isinstance(e.value, int) for e in call.args[1].elts)
            and [k.arg for k in call.keywords] == ["value"]
            and ast.unparse(call.keywords[0].value).replace('"', "'") == "float('-inf')"):
        return None
    return stmt.targets[0].id, call.args[0], call.args[1]


def _module_call(stmt) -> tuple[str, str] | None:
    """``y = self.m(t, ...)`` (t a name, then keywords only) -> (m, t)."""
    call = stmt.value if isinstance(stmt, ast.Assign) else None
    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)
            and call.func.value.id == "self" and len(call.args) == 1 and isinstance(call.args[0], ast.Name)):
        return call.func.attr, call.args[0].id
    return None


@functools.lru_cache(maxsize=None)
def _rewritten(cls: type) -> tuple[type, tuple[str, ...]] | None:
    """A subclass of ``cls`` whose forward gives its -inf pads to the modules that read them, and those modules'
    names (None where there is none, or where the forward assigns a name twice: then moving a read could change
    what it reads)."""
    forward = forward_tree(cls)
    stores = Counter(n.id for n in ast.walk(forward) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    loads = Counter(n.id for n in ast.walk(forward) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load))
    if any(count > 1 for count in stores.values()):
        return None
    pads = {pad[0]: pad for pad in map(_inf_pad, forward.body) if pad and loads[pad[0]] == 1}
    given = {}
    for stmt in forward.body:
        call = _module_call(stmt)
        if call and call[1] in pads and all(k.arg != "pad" for k in stmt.value.keywords):
            _, source, sides = pads[call[1]]
            stmt.value.args = [source]
            stmt.value.keywords.append(ast.keyword("pad", sides))
            given[call[1]] = call[0]
    if not given:
        return None
    forward.body = [s for s in forward.body if not (_inf_pad(s) and _inf_pad(s)[0] in given)]
    forward.decorator_list = []
    made = type(cls.__name__, (cls,), {
        "forward": compile_in_module(cls, forward, f"<{cls.__name__} with its pools' pads given to them>"),
        "forward_source": ast.unparse(ast.fix_missing_locations(forward)),
        "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return made, tuple(given.values())


def fold_pool_pads_(model: nn.Module, pool_type: type) -> nn.Module:
    """``model`` (in place) with its forward's -inf pads given to the pools that read them (``_rewritten``), where
    every such module is a ``pool_type`` (``pools.MaxPool2dLayer``, which takes them); else unchanged."""
    found = _rewritten(type(model))
    if found is None:
        return model
    cls, pools = found
    if all(type(getattr(model, name, None)) is pool_type for name in pools):
        model.__class__ = cls
    return model
