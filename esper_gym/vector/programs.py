"""A seed graph run once for a group of copies, on their stacked tensors.

A graph of linear layers and elementwise ops only (residual_mlp, low_rank, squeeze_excite) runs
as a `_stacked_program` on the stacked tensors, one `baddbmm` per linear, bit for bit each
kernel's own call (vmap's batched linear is a matmul plus a bias add, ~1.5x slower with its
backward). Any other graph runs under `torch.func.vmap`, as a copy of the graph in which the
ops vmap has no batching rule for are rewritten (`_batchable`: attention's `sym_size.int` and
its CPU flash attention, which would run one copy at a time, become `Tensor.size` and the math
form of scaled dot-product attention: equal up to rounding); the per-copy path runs the
validated graph itself. Nothing here is loaded or evaluated but the graph's own ops.
"""

from __future__ import annotations

import functools
import math
import time
import weakref

import torch

from esper_gym.kasmina.recovery import form_fault

# Graphs vmap could not run (no batching rule); they go per copy from then on.
_NOT_VMAPPABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Graphs vmap has run with a well-formed output: their groups may be stacked (_SeedStack).
_VMAPPABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vmapped_call(graph, states: list[torch.Tensor], x: torch.Tensor):
    """(the stacked output, wall seconds) of the group's graph over its stacked tensors
    `states` (under vmap, or as a `_stacked_program`), or None when vmap cannot run it or its
    output is not x's shape, dtype and device (the per-copy path then names each copy's fault
    as the single env would)."""
    program = _stacked_program(graph) if x.dim() == 3 else None
    batchable = _batchable(graph) if program is None else None
    start = time.perf_counter()
    try:
        if program is not None:
            y = program(states, x)
        else:
            y = torch.func.vmap(lambda state, xi: batchable.forward(*state, xi)[0])(states, x)
    except Exception:
        _NOT_VMAPPABLE[graph] = True
        return None
    elapsed = time.perf_counter() - start
    if form_fault(y, x) is not None:
        return None
    _VMAPPABLE[graph] = True
    return y, elapsed


# Elementwise ops a stacked program applies as they are (they act on (copies, B, D) as on (B, D)).
_UNARY = frozenset(
    {
        torch.ops.aten.gelu.default,
        torch.ops.aten.relu.default,
        torch.ops.aten.sigmoid.default,
        torch.ops.aten.tanh.default,
        torch.ops.aten.silu.default,
    }
)
# Elementwise ops of two activations of the same shape (not of a parameter, whose shape lacks
# the batch dimension): applied as they are.
_BINARY = frozenset(
    {torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor}
)
_STACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stacked_program(graph: torch.fx.GraphModule):
    """For a graph made only of linear layers of its parameters and parameter-free elementwise
    ops (residual_mlp, low_rank, squeeze_excite): a function (states, x) -> y running it on the
    stacked tensors directly, each linear one `baddbmm` (what `F.linear` computes per copy,
    forward and backward, as the stacked host layers do). vmap's batched `linear` is a matmul
    plus a separate bias add with a slower backward (~1.5x for residual_mlp at 32 copies). None
    for any other graph: vmap runs it."""
    cached = _STACKED.get(graph)
    if cached is not None:
        return cached or None
    nodes = list(graph.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    params = set(placeholders[:-1])  # the state inputs; the last one is the activation
    # The program as plain data (value indices), not nodes: a node holds its graph, and the
    # cache must not keep its key alive. ("linear", a, w, bias or None) or (op, a[, b]).
    index = {node: i for i, node in enumerate(placeholders)}
    ops: list[tuple] = []
    result, ok = None, bool(placeholders)
    for node in nodes[len(placeholders) :]:
        if node.op == "output":
            out = node.args[0]
            ok = ok and isinstance(out, (tuple, list)) and len(out) == 1
            ok = ok and isinstance(out[0], torch.fx.Node) and out[0] not in params
            result = index.get(out[0]) if ok else None
            break
        if node.op != "call_function" or node.kwargs:
            ok = False
        elif node.target is torch.ops.aten.linear.default:
            a, w, *bias = node.args
            bias = [b for b in bias if b is not None]
            ok = a in index and a not in params and w in params and len(bias) <= 1
            ok = ok and all(b in params for b in bias)
            if ok:
                ops.append(("linear", index[a], index[w], index[bias[0]] if bias else None))
        elif node.target in _UNARY or node.target in _BINARY:
            arity = 1 if node.target in _UNARY else 2
            ok = len(node.args) == arity and all(
                arg in index and arg not in params for arg in node.args
            )
            if ok:
                ops.append((node.target, *(index[arg] for arg in node.args)))
        else:
            ok = False
        if not ok:
            break
        index[node] = len(index)
    ok = ok and result is not None
    program = functools.partial(_run_stacked, tuple(ops), result) if ok else False
    _STACKED[graph] = program
    return program or None


def _run_stacked(ops: tuple, result: int, states: list[torch.Tensor], x: torch.Tensor):
    """Run a `_stacked_program` on states (copies, ...) and x (copies, B, D)."""
    values = [*states, x]
    for op in ops:
        if isinstance(op[0], str):  # "linear"
            _, a, w, b = op
            weight = values[w].transpose(1, 2)
            if b is None:
                values.append(torch.bmm(values[a], weight))
            else:
                values.append(torch.baddbmm(values[b].unsqueeze(1), values[a], weight))
        else:
            values.append(op[0](*(values[i] for i in op[1:])))
    return values[result]


def _size(x: torch.Tensor, dim: int) -> int:
    return x.size(dim)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v) (no mask, no dropout, not causal), as its math
    backend computes it."""
    scale = 1.0 / math.sqrt(q.size(-1))
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v


# Ops vmap has no batching rule for, and what the batchable copy of a graph calls instead:
# sym_size.int of a batched input raises; CPU flash attention would run one copy at a time.
_REWRITES = {
    torch.ops.aten.sym_size.int: _size,
    torch.ops.aten.scaled_dot_product_attention.default: _attention,
}
_BATCHABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batchable(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph vmap runs: the validated graph itself, or (attention) a copy of it in which
    each op of `_REWRITES` calls its replacement, same inputs, same result up to rounding. Built
    once per graph from its nodes (nothing is loaded or evaluated but the graph's own ops);
    the per-copy path still runs the validated graph as the single env does."""
    batchable = _BATCHABLE.get(graph)
    if batchable is not None:
        return batchable or graph  # False: nothing to rewrite (no strong reference to the key)
    new: torch.fx.Graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    rewritten = False
    for node in graph.graph.nodes:
        target = _REWRITES.get(node.target) if node.op == "call_function" else None
        # sdpa with anything beyond (q, k, v) (a mask, dropout, causal) is left to vmap
        if target is _attention and (len(node.args) != 3 or node.kwargs):
            target = None
        if target is None:
            env[node] = new.node_copy(node, lambda n: env[n])
        else:
            args = torch.fx.map_arg(node.args, lambda n: env[n])
            env[node] = new.call_function(target, args)
            env[node].meta = dict(node.meta)
            rewritten = True
    batchable = torch.fx.GraphModule(graph, new) if rewritten else False
    _BATCHABLE[graph] = batchable
    return batchable or graph
