"""FX pass over the Dynamo graph: planned linears become ``wisparse::sparse_linear``.

Matches: ``call_function`` nodes of a known linear form (see ``linear_forms``: ``linear``,
``addmm``, ``matmul``/``mm``) whose weight operand is a graph input (placeholder), directly or
through permuting views (``.T``, ``t``, ``transpose``, ``permute``), whose example value is a
planned weight (one that ``attach`` registered). Tying a node to a plan entry by the weight *object* is exact and needs no
names, and it survives graph breaks (sources relative to a frame) and tied weights.

Emits: ``torch.ops.wisparse.sparse_linear(x, weight, bias, thresholds, max_sparse_rows)`` in
place of the linear (``weight`` as ``[out, in]``: an ``[in, out]`` parameter enters as its ``t()``
view, no copy; a ``matmul``'s separate bias add stays as it was), where ``thresholds`` is a new placeholder appended after the graph's inputs
(one per distinct weight). The backend feeds it at run time with the thresholds of the weight
actually passed, so one compiled graph serves any model instance with any plan.
Every other linear is left as it was, with the reason recorded. Contractions of stacked 3-D
expert weights (grouped mm, ``bmm`` on ``W[expert_ids]``) go to ``sparse_experts``, with [E, in]
thresholds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..attach import site_of, thresholds_of
from ..config import BackendConfig
from ..linear_forms import call_operands, form_of, view_dims

log = logging.getLogger(__name__)

SPARSE = "sparse"
DENSE = "dense"
FUSED = "fused"  # sparse, and fused with its siblings (``passes/fuse_siblings.py``)


@dataclass
class LinearDecision:
    """What the pass did with one linear node."""

    node: str
    form: str
    name: str | None  # plan key, if the weight is planned
    weight_shape: tuple[int, ...] | None
    dtype: str | None
    decision: str  # SPARSE, FUSED or DENSE
    reason: str = ""
    weight_input: int | None = None  # index of the weight's graph input (debug reports name it)


@dataclass
class RewriteResult:
    """Decisions per linear, and the weight input index that feeds each appended threshold input.

    unplanned_weight_inputs: input indices of weights of linears left dense for want of a plan
    (watched at run time, in case a plan is attached after compiling).
    """

    decisions: list[LinearDecision] = field(default_factory=list)
    unplanned_weight_inputs: list[int] = field(default_factory=list)
    threshold_sources: list[int] = field(default_factory=list)
    threshold_examples: list[torch.Tensor] = field(default_factory=list)

    @property
    def rewritten(self) -> int:
        return sum(d.decision in (SPARSE, FUSED) for d in self.decisions)

    def summary(self) -> str:
        dense = [d for d in self.decisions if d.decision == DENSE]
        reasons: dict[str, int] = {}
        for d in dense:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
        why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        return f"{len(self.decisions)} linears: {self.rewritten} sparse, {len(dense)} dense" + (f" ({why})" if why else "")


def _example_value(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _token_rows(x: torch.Tensor) -> Any:
    if x.dim() == 0 or x.shape[-1] == 0:
        return 0
    rows = 1
    for size in x.shape[:-1]:
        rows = rows * size
    return rows


_VIEW_METHODS = ("t", "transpose", "permute", "swapaxes", "swapdims")
_VIEW_FUNCTIONS = {torch.t: "t", torch.transpose: "transpose", torch.permute: "permute"}


def _view_of(node: fx.Node) -> tuple[fx.Node, str, tuple[Any, ...]] | None:
    """(source, kind, extra args) if ``node`` is a permuting view op, else None."""
    if node.op == "call_method" and node.target in _VIEW_METHODS and node.args:
        return node.args[0], str(node.target), tuple(node.args[1:])
    if node.op == "call_function" and node.args:
        if node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
            return node.args[0], node.args[1], ()
        kind = _VIEW_FUNCTIONS.get(node.target) if not isinstance(node.target, str) else None
        if kind is not None:
            return node.args[0], kind, tuple(node.args[1:])
    return None


def weight_root(node: Any) -> tuple[fx.Node, tuple[int, ...]] | None:
    """The placeholder a weight operand views, and the root dim behind each of its dims."""
    dims: tuple[int, ...] | None = None
    while isinstance(node, fx.Node):
        if node.op == "placeholder":
            val = _example_value(node)
            ndim = val.dim() if isinstance(val, torch.Tensor) else 0
            return node, dims if dims is not None else tuple(range(ndim))
        view = _view_of(node)
        if view is None or node.kwargs:
            return None
        source, kind, extra = view
        val = _example_value(source)
        if not isinstance(val, torch.Tensor) or (step := view_dims(kind, val.dim(), extra)) is None:
            return None
        dims = step if dims is None else tuple(step[d] for d in dims)
        node = source
    return None


def _is_expert_contraction(node: fx.Node) -> bool:
    """bmm / grouped mm nodes (stacked expert weights) left after the rewrite (forms it did not match)."""
    if node.op != "call_function" or str(node.target).startswith("wisparse."):
        return False
    return node.target in (torch.bmm, torch.baddbmm) or "grouped_mm" in str(node.target)


def _operand_parameter(node: Any, example_inputs: Sequence[Any], index_of: dict[fx.Node, int]) -> Any:
    """The parameter behind an operand reached through views and indexing (W[expert_ids]), or None."""
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            value = example_inputs[index_of[node]] if node in index_of else None
            return value if isinstance(value, torch.nn.Parameter) else None
        if not node.args:
            return None
        node = node.args[0]
    return None


def copy_dynamo_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a Dynamo graph module that a pass may edit.

    Dynamo keeps using its own graph after the backend returns (it reads each placeholder's
    ``grapharg``), so passes that add inputs must work on a copy. The copy keeps the metadata
    AOT autograd reads from Dynamo graphs (node ``_dynamo_source``, ``gm.meta``, param sources).
    """
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    for old, new in val_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    for key, value in gm.__dict__.items():
        copy.__dict__.setdefault(key, value)
    copy.meta.update(gm.meta)
    return copy


def replace_node(node: fx.Node, new: fx.Node) -> None:
    """Put ``new`` in place of ``node``, keeping the source location and module stack.

    Errors inside a rewritten op then point at the model's source line.
    """
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "example_value", "val"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _nodes_under_autocast(graph: fx.Graph) -> set[fx.Node]:
    """Nodes under autocast: between Dynamo's ``_enter_autocast``/``_exit_autocast``, or all of
    them when the graph is compiled inside the caller's autocast context.

    Autocast would run such a linear in the autocast dtype; the sparse op has no autocast rule,
    so rewriting it would silently change the precision. Those linears stay dense.
    """
    if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
        return set(graph.nodes)  # compiled inside the caller's autocast: the whole graph is
    inside: set[fx.Node] = set()
    enabled: list[bool] = []  # one entry per open autocast context: is it enabled?
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.amp._enter_autocast:
            args = list(node.args) + [None] * 3
            enabled.append(bool(node.kwargs.get("enabled", args[2] if args[2] is not None else True)))
        elif node.op == "call_function" and node.target is torch.amp._exit_autocast:
            if enabled:
                enabled.pop()
        elif enabled and enabled[-1]:
            inside.add(node)
    return inside


def rewrite_sparse_linears(
    gm: fx.GraphModule, example_inputs: Sequence[Any], config: BackendConfig | None = None
) -> RewriteResult:
    """Rewrite planned linears in ``gm`` in place; see the module docstring."""
    config = config or BackendConfig()
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    index_of = {n: i for i, n in enumerate(placeholders)}
    result = RewriteResult()
    threshold_nodes: dict[int, fx.Node] = {}
    autocast_nodes = _nodes_under_autocast(graph)

    def threshold_input(w_index: int, weight: torch.Tensor) -> fx.Node:
        """The appended input that carries ``weight``'s thresholds (one per distinct weight)."""
        if w_index not in threshold_nodes:
            with graph.inserting_after(placeholders[-1]):
                t_node = graph.placeholder(f"wisparse_thresholds_{len(threshold_nodes)}")
            placeholders.append(t_node)
            t_example = thresholds_of(weight)
            t_node.meta["example_value"] = t_example
            # An input without a user-code source (as DDPOptimizer's split graphs have), static
            # like a parameter so CUDA graphs do not copy it on every replay.
            t_node._dynamo_source = None
            t_node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
            threshold_nodes[w_index] = t_node
            result.threshold_sources.append(w_index)
            result.threshold_examples.append(t_example)
        return threshold_nodes[w_index]

    from .sparse_experts import match_expert_contraction, rewrite_expert_contraction  # imports this module

    for node in list(graph.nodes):
        if (expert := match_expert_contraction(node)) is not None and expert.weight in index_of:
            decision = rewrite_expert_contraction(graph, node, expert, example_inputs, index_of, config, threshold_input)
            result.decisions.append(decision)
            if decision.reason == "no plan entry":
                result.unplanned_weight_inputs.append(index_of[expert.weight])
            continue
        if node.op != "call_function" or (form := form_of(node.target)) is None:
            continue
        x_node, w_node, b_node = call_operands(form, node.args, node.kwargs)
        x_val, w_val = _example_value(x_node), _example_value(w_node)
        decision = LinearDecision(
            node=node.name, form=form.name, name=None,
            weight_shape=tuple(w_val.shape) if isinstance(w_val, torch.Tensor) else None,
            dtype=str(x_val.dtype).removeprefix("torch.") if isinstance(x_val, torch.Tensor) else None,
            decision=DENSE,
        )
        # A matmul is a linear only if its weight operand is a 2-D parameter (attention is not).
        needs_parameter = form.bias_arg is None
        root = weight_root(w_node)
        if root is None or root[0] not in index_of:
            if not needs_parameter:
                decision.reason = "weight is not a graph input"
                result.decisions.append(decision)
            continue
        w_node, dims = root
        decision.weight_input = index_of[w_node]
        weight = example_inputs[index_of[w_node]]
        if needs_parameter and not (
            isinstance(weight, torch.nn.Parameter) and weight.dim() == 2 and isinstance(w_val, torch.Tensor) and w_val.dim() == 2
        ):
            continue
        result.decisions.append(decision)
        site = site_of(weight)
        if site is None:
            decision.reason = "no plan entry"
            result.unplanned_weight_inputs.append(index_of[w_node])
            continue
        in_dim = dims[form.weight_in_dim]
        if in_dim != site.in_dim:
            decision.name = site.name
            decision.reason = f"weight used with input channels on dim {in_dim}, planned on dim {site.in_dim}"
            continue
        if any(node.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
            decision.name = site.name
            decision.reason = "addmm with alpha/beta scaling"
            continue
        decision.name = site.name
        if not isinstance(x_val, torch.Tensor) or not x_val.is_floating_point():
            decision.reason = f"unsupported input dtype {decision.dtype}"
            continue
        if x_val.dtype != weight.dtype:
            decision.reason = f"input dtype {decision.dtype} differs from weight dtype"
            continue
        if node in autocast_nodes:
            decision.reason = "inside an autocast region (the sparse op has no autocast rule)"
            continue
        if not config.mask_prefill and not statically_known_true(_token_rows(x_val) <= config.max_sparse_rows):
            decision.reason = "prefill left dense (mask_prefill=False)"
            continue
        w_index = index_of[w_node]
        t_node = threshold_input(w_index, weight)
        with graph.inserting_before(node):
            w_operand = w_node
            if in_dim == 0:  # [in, out] parameter: its t() is the [out, in] view the op takes
                w_operand = graph.call_function(torch.t, (w_node,))
                w_operand.meta["example_value"] = _example_value(w_node).t()
            new = graph.call_function(
                torch.ops.wisparse.sparse_linear.default,
                (x_node, w_operand, b_node, t_node, config.max_sparse_rows),
            )
        replace_node(node, new)
        decision.node = new.name
        decision.decision = SPARSE
        log.debug("sparse: %s (%s %s) via %s", site.name, decision.weight_shape, decision.dtype, new.name)

    for node in graph.nodes:
        if _is_expert_contraction(node) and any(
            _operand_parameter(a, example_inputs, index_of) is not None for a in node.args[:2]
        ):
            result.decisions.append(LinearDecision(
                node=node.name, form=str(node.target), name=None, weight_shape=None, dtype=None, decision=DENSE,
                reason="stacked expert weights in a form the pass does not match",
            ))
    for d in result.decisions:
        if d.decision == DENSE:
            log.debug("dense: %s %s: %s", d.node, d.name or "", d.reason)
    if result.rewritten:
        graph.lint()
        gm.recompile()
    return result
