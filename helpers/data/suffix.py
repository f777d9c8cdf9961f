"""The network from a layer on: the statements of Lucent's straight-line ``forward`` after the one that makes a
layer's output, as a function of that output.

Chapter 03's spliced-in evaluation runs the network once per case with one layer's output replaced (the SAE's
reconstruction, each branch alone, the floors; in the families sweep, every SAE of the layer): the layers before
the replaced one compute the same activations every time, and at mixed4a they are most of the network's
arithmetic (the stem and mixed3a-b at 56 and 28 px against 14 and 7 px after). ``forward_from`` runs only the
layers after it, with the same modules and operations in the same order, so its numbers are those of the whole
network with a hook that replaces the output (tests/test_inception.py compares them bit for bit).
"""

from __future__ import annotations

import ast
import functools
import inspect

from torch import nn

from helpers.data.folded import compile_in_module, forward_tree


@functools.lru_cache(maxsize=None)
def _suffix(cls: type, layer: str):
    """``cls.forward``'s statements after ``layer = ...``, compiled as ``f(self, layer_output)`` in the namespace of
    ``cls``'s module (so the functions it calls are those the whole forward calls, patched ones included)."""
    forward = forward_tree(cls)  # its forward's source (as rewritten, for a class fold_pool_pads_ made)
    made = [i for i, s in enumerate(forward.body) if isinstance(s, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == layer for t in s.targets)]
    if len(made) != 1:
        raise ValueError(f"{cls.__name__}.forward assigns {layer!r} {len(made)} times (expected once): "
                         f"run the whole network with a hook instead (spliced_log_probs without acts)")
    before = {n.id for s in forward.body[:made[0]] for n in ast.walk(s)
              if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    before |= {a.arg for a in forward.args.args[1:]}
    rest = forward.body[made[0] + 1:]
    read = {n.id for s in rest for n in ast.walk(s) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    if read & before:
        raise ValueError(f"{cls.__name__}.forward reads {sorted(read & before)} after {layer!r}: the layers after it "
                         f"are not a function of its output alone; run the whole network with a hook instead")
    forward.name, forward.decorator_list, forward.body = f"forward_from_{layer}", [], rest
    forward.args = ast.arguments(posonlyargs=[], args=[ast.arg("self"), ast.arg(layer)], kwonlyargs=[],
                                 kw_defaults=[], defaults=[])
    return compile_in_module(cls, forward, inspect.getsourcefile(cls))


def forward_from(model: nn.Module, layer: str, output):
    """What ``model(x)`` returns when ``layer``'s output on ``x`` is ``output``, running only the layers after it
    (forward hooks on those modules fire as in the whole pass)."""
    return _suffix(type(model), layer)(model, output)
