"""Match the plain linear forms of a Dynamo graph and emit ``wisparse::sparse_linear`` for them.

Matches ``call_function`` nodes of the forms of ``linear_forms`` whose weight operand is a graph
input (placeholder), directly or through permuting views (``.T``, ``t``, ``transpose``,
``permute``):
- ``linear(x, W[out, in], b)`` (``nn.Linear``, ``F.linear``, routers);
- ``addmm(b, x2d, W[in, out])`` (1-D-convolution-style linears); with ``alpha``/``beta`` scaling it
  matches but must stay dense;
- ``matmul(x, W)`` / ``mm`` with W a 2-D parameter, ``[in, out]`` or ``W.T`` (attention's matmuls
  use no parameter and are not matched).

Emits, before the matched node, ``sparse_linear(x, weight, bias, thresholds, max_sparse_rows)``
with ``weight`` as ``[out, in]``: an ``[in, out]`` parameter enters as its ``t()`` view (no copy,
placed just before the op); a tensor-parallel (DTensor) parameter, reached through the engine's
``to_local()``, enters as its local shard. A ``matmul``'s separate bias add stays as it was. Whether a match may
be rewritten is for ``eligibility``; the driver (``sparsify``) replaces the node.

The op's ``layout`` follows the weight's storage: a weight that ``attach(..., weights="int8")``
quantized (an ``Int8Weight``) emits ``sparse_linear(x, W.qdata, bias, thresholds, max_sparse_rows,
"int8", W.scale)``, one that ``weights="int4"`` quantized (an ``Int4Weight``) emits
``sparse_linear(x, W.qdata, bias, thresholds, max_sparse_rows, "int4", W.scale, out_features)``
(``qdata``/``scale`` read off the graph input, which AOT autograd flattens into its inner tensors);
``thresholds=None`` for a quantized weight without a plan (the output head: a dense quantized GEMV).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from ..config import BackendConfig
from ..kernels import Layout, Route
from ..kernels.routing import token_rows
from ..linear_forms import ADDMM, LINEAR, MATMUL, LinearForm, call_operands, form_of
from ..quant.tensors import weight_format
from ..sharding import local_tensor
from .decisions import DenseReason
from .eligibility import expected_route
from .graph_utils import GraphInputs, example_value, local_operand, weight_root


@dataclass(frozen=True)
class LinearMatch:
    """A matched plain linear.

    weight: the weight's placeholder, or None when the operand is not a graph input (then
        ``problem`` says so); in_dim: that placeholder's dim holding input channels in this call;
    problem: a reason of this form to stay dense whatever the plan says.
    """

    form: str
    x: Any
    weight_operand: Any
    weight: fx.Node | None
    in_dim: int
    bias: Any
    problem: tuple[DenseReason, str] | None = None

    @property
    def label(self) -> str:
        return self.form

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The weight operand's shape as the call sees it (reports prefer the parameter's)."""
        value = example_value(self.weight_operand)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    @property
    def rows(self) -> Any:
        x = example_value(self.x)
        return token_rows(x) if isinstance(x, torch.Tensor) else 0

    @property
    def layout(self) -> Layout:
        """The weight's layout: ``int8``/``int4`` for a quantized weight (``quant.Int8Weight``/``Int4Weight``,
        an ``[out, in]`` linear), else ``float``."""
        if self.weight is None or self.in_dim != 1:
            return Layout.FLOAT
        return Layout(weight_format(example_value(self.weight)) or Layout.FLOAT)

    def route(self, config: BackendConfig) -> Route:
        value = example_value(self.weight) if self.weight is not None else None
        layout = self.layout
        if layout is not Layout.FLOAT:
            weight = value.qdata  # the operand the op receives
        else:
            weight = local_tensor(value) if value is not None else None
            if isinstance(weight, torch.Tensor) and self.in_dim == 0:
                weight = weight.t()  # the op takes the [out, in] view (see emit)
        return expected_route(example_value(self.x), weight, layout, config)

    def emit(self, graph: fx.Graph, node: fx.Node, thresholds: fx.Node | None, config: BackendConfig) -> fx.Node:
        """``sparse_linear`` with the weight's layout before ``node`` (the caller replaces ``node`` by
        it); dense when ``thresholds`` is None (a quantized weight without a plan)."""
        with graph.inserting_before(node):
            if self.layout is not Layout.FLOAT:
                return self._emit_quantized(graph, thresholds, config)
            weight = local_operand(graph, self.weight)  # a tensor-parallel weight: its local shard
            if self.in_dim == 0:  # [in, out] parameter: its t() is the [out, in] view the op takes
                source = weight
                weight = graph.call_function(torch.t, (source,))
                weight.meta["example_value"] = example_value(source).t()
            return graph.call_function(
                torch.ops.wisparse.sparse_linear.default,
                (self.x, weight, self.bias, thresholds, config.max_sparse_rows),
            )

    def _emit_quantized(self, graph: fx.Graph, thresholds: fx.Node | None, config: BackendConfig) -> fx.Node:
        weight = example_value(self.weight)
        parts = []
        for attr in ("qdata", "scale"):
            part = graph.call_function(getattr, (self.weight, attr))
            part.meta["example_value"] = getattr(weight, attr)
            parts.append(part)
        qdata, scale = parts
        args = (self.x, qdata, self.bias, thresholds, config.max_sparse_rows, self.layout.value, scale)
        if self.layout is Layout.INT4:  # the output count: an odd one leaves a spare nibble
            args += (weight.out_features,)
        return graph.call_function(torch.ops.wisparse.sparse_linear.default, args)


def _match_form(form: LinearForm, node: fx.Node, inputs: GraphInputs) -> LinearMatch:
    x, w, b = call_operands(form, node.args, node.kwargs)
    root = weight_root(w)
    if root is None or root[0] not in inputs.index_of:
        return LinearMatch(form.name, x, w, None, -1, b, (DenseReason.NOT_A_GRAPH_INPUT, "weight is not a graph input"))
    placeholder, dims = root
    return LinearMatch(form.name, x, w, placeholder, dims[form.weight_in_dim], b)


def match_linear_call(node: fx.Node, inputs: GraphInputs) -> LinearMatch | None:
    """``linear(x, W, b)``."""
    return _match_form(LINEAR, node, inputs)


def match_addmm(node: fx.Node, inputs: GraphInputs) -> LinearMatch | None:
    """``addmm(b, x, W)``; scaled (``alpha``/``beta`` not 1) is no plain linear: it stays dense."""
    match = _match_form(ADDMM, node, inputs)
    if match.problem is None and any(node.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
        match = dataclasses.replace(match, problem=(DenseReason.SCALED_ADDMM, "addmm with alpha/beta scaling"))
    return match


def match_matmul(node: fx.Node, inputs: GraphInputs) -> LinearMatch | None:
    """``x @ W``: a linear only when W is a 2-D parameter; anything else (attention) is no match."""
    match = _match_form(MATMUL, node, inputs)
    weight, operand = inputs.example(match.weight), example_value(match.weight_operand)
    is_linear = (
        isinstance(weight, torch.nn.Parameter) and weight.dim() == 2
        and isinstance(operand, torch.Tensor) and operand.dim() == 2
    )
    return match if is_linear else None


_MATCHERS: dict[str, Callable[[fx.Node, GraphInputs], LinearMatch | None]] = {
    LINEAR.name: match_linear_call, ADDMM.name: match_addmm, MATMUL.name: match_matmul,
}


def match_linear(node: fx.Node, inputs: GraphInputs) -> LinearMatch | None:
    """The plain linear ``node`` performs, or None."""
    if node.op != "call_function" or (form := form_of(node.target)) is None:
        return None
    return _MATCHERS[form.name](node, inputs)
