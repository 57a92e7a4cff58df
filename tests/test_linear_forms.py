"""Linear recognition by dataflow in eager code (LinearCallResolver): the weight, its input dim and the
activation of every call form. (The FX side, ``weight_root``: tests/passes/test_graph_utils.py.)"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from wisparse_compile.observer import LinearObserver

W_OUT_IN = torch.nn.Parameter(torch.randn(6, 4))  # [out, in]
W_IN_OUT = torch.nn.Parameter(torch.randn(4, 6))  # [in, out]
X = torch.randn(3, 4)

CASES = {  # name: (call, weight, expected in_dim)
    "linear": (lambda: F.linear(X, W_OUT_IN), W_OUT_IN, 1),
    "addmm": (lambda: torch.addmm(torch.zeros(6), X, W_IN_OUT), W_IN_OUT, 0),
    "matmul_T": (lambda: X @ W_OUT_IN.T, W_OUT_IN, 1),
    "matmul_t": (lambda: torch.matmul(X, W_OUT_IN.t()), W_OUT_IN, 1),
    "matmul_transpose": (lambda: X @ W_OUT_IN.transpose(0, 1), W_OUT_IN, 1),
    "matmul_permute_twice": (lambda: X @ W_IN_OUT.permute(1, 0).T, W_IN_OUT, 0),
    "linear_of_view": (lambda: F.linear(X, W_IN_OUT.t()), W_IN_OUT, 0),
    # operands by keyword
    "linear_keywords": (lambda: F.linear(input=X, weight=W_OUT_IN), W_OUT_IN, 1),
    "linear_weight_keyword": (lambda: F.linear(X, weight=W_OUT_IN.T.T), W_OUT_IN, 1),
    "addmm_keywords": (lambda: torch.addmm(torch.zeros(6), mat1=X, mat2=W_IN_OUT), W_IN_OUT, 0),
    "matmul_keywords": (lambda: torch.matmul(input=X, other=W_OUT_IN.T), W_OUT_IN, 1),
}


class _Record(LinearObserver):
    def __init__(self, watched, replace=None):
        super().__init__(lambda t: any(t is w for w in watched))
        self.calls = []
        self.replace = replace

    def on_linear(self, call):
        self.calls.append(call)
        return None if self.replace is None else self.replace(call.x)


@pytest.mark.parametrize("case", CASES)
def test_eager_resolves_weight_and_input_dim(case):
    call, weight, in_dim = CASES[case]
    with _Record([W_OUT_IN, W_IN_OUT]) as rec:
        call()
    assert len(rec.calls) == 1
    assert rec.calls[0].weight is weight and rec.calls[0].in_dim == in_dim and rec.calls[0].x is X


@pytest.mark.parametrize("case", CASES)
def test_replaced_input_reaches_the_call(case):
    """Whatever slot the input came in (positional or keyword), the observer's replacement is what
    the call computes with: here zeros, so the linear's output is its bias (zero) only."""
    call, weight, _ = CASES[case]
    with _Record([W_OUT_IN, W_IN_OUT], replace=torch.zeros_like) as rec:
        out = call()
    assert len(rec.calls) == 1 and torch.count_nonzero(out) == 0
    assert torch.count_nonzero(call()) > 0  # outside the observer the call is unchanged


def test_activation_matmul_is_not_a_linear():
    with _Record([W_OUT_IN]) as rec:
        X @ X.T
    assert rec.calls == []
