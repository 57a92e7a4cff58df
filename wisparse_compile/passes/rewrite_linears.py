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

The op follows the weight's storage: a weight that ``attach(..., weights="int8")`` quantized (an
``Int8Weight``) emits ``sparse_linear_int8(x, W.qdata, W.scale, bias, thresholds, max_sparse_rows)``,
one that ``weights="int4"`` quantized (an ``Int4Weight``) emits ``sparse_linear_int4(x, W.qdata,
W.scale, out_features, bias, thresholds, max_sparse_rows)`` (``qdata``/``scale`` read off the graph
input, which AOT autograd flattens into its inner tensors); ``thresholds=None`` for a quantized
weight without a plan (the output head: a dense quantized GEMV).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from ..config import BackendConfig
from ..kernels import route_of_int4, route_of_int8, routing
from ..linear_forms import ADDMM, LINEAR, MATMUL, LinearForm, call_operands, form_of
from ..quantize import weight_format
from ..sharding import local_tensor
from .decisions import DenseReason, Route
from .eligibility import expected_route
from .graph_utils import GraphInputs, example_value, local_operand, token_rows, weight_root


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
    def quantized(self) -> str | None:
        """The weight's quantized format (``"int8"``/``"int4"``: ``quantize.Int8Weight``/``Int4Weight``),
        whose op serves it, or None."""
        if self.weight is None or self.in_dim != 1:
            return None
        return weight_format(example_value(self.weight))

    def route(self, config: BackendConfig) -> Route:
        weight = local_tensor(example_value(self.weight)) if self.weight is not None else None
        if self.quantized:
            routes, route_of_call, dense = _QUANTIZED_ROUTES[self.quantized]
            x = example_value(self.x)
            return routes[route_of_call(x, config.max_sparse_rows)] if isinstance(x, torch.Tensor) else dense
        if isinstance(weight, torch.Tensor) and self.in_dim == 0:
            weight = weight.t()  # the op takes the [out, in] view (see emit)
        return expected_route(example_value(self.x), weight, config)

    def emit(self, graph: fx.Graph, node: fx.Node, thresholds: fx.Node | None, config: BackendConfig) -> fx.Node:
        """``sparse_linear`` (``sparse_linear_int8``/``_int4`` for quantized weights; dense when
        ``thresholds`` is None) before ``node`` (the caller replaces ``node`` by it)."""
        if self.quantized:
            return self._emit_quantized(graph, node, thresholds, config)
        with graph.inserting_before(node):
            weight = local_operand(graph, self.weight)  # a tensor-parallel weight: its local shard
            if self.in_dim == 0:  # [in, out] parameter: its t() is the [out, in] view the op takes
                source = weight
                weight = graph.call_function(torch.t, (source,))
                weight.meta["example_value"] = example_value(source).t()
            return graph.call_function(
                torch.ops.wisparse.sparse_linear.default,
                (self.x, weight, self.bias, thresholds, config.max_sparse_rows),
            )

    def _emit_quantized(self, graph: fx.Graph, node: fx.Node, thresholds: fx.Node | None, config: BackendConfig) -> fx.Node:
        weight = example_value(self.weight)
        with graph.inserting_before(node):
            parts = []
            for attr in ("qdata", "scale"):
                part = graph.call_function(getattr, (self.weight, attr))
                part.meta["example_value"] = getattr(weight, attr)
                parts.append(part)
            if self.quantized == "int4":  # the output count: an odd one leaves a spare nibble
                return graph.call_function(
                    torch.ops.wisparse.sparse_linear_int4.default,
                    (self.x, parts[0], parts[1], weight.out_features, self.bias, thresholds, config.max_sparse_rows),
                )
            return graph.call_function(
                torch.ops.wisparse.sparse_linear_int8.default,
                (self.x, parts[0], parts[1], self.bias, thresholds, config.max_sparse_rows),
            )


_INT8_ROUTES = {
    routing.TRITON: Route.INT8_TRITON, routing.CPU_KERNEL: Route.INT8_CPU_KERNEL, routing.MASKED_DENSE: Route.INT8_DENSE,
}
_INT4_ROUTES = {routing.CPU_KERNEL: Route.INT4_CPU_KERNEL, routing.MASKED_DENSE: Route.INT4_DENSE}  # route_of_int4 never says TRITON
#: per format: its routes, its route chooser, and the route of a call with no example input
_QUANTIZED_ROUTES = {
    "int8": (_INT8_ROUTES, route_of_int8, Route.INT8_DENSE), "int4": (_INT4_ROUTES, route_of_int4, Route.INT4_DENSE),
}


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
