"""The backend's runtime: ``ThresholdFeed`` hands a compiled graph the thresholds of the weights
actually passed, resolved once per (weights, plan generation), and lets go of a deleted model's weights."""

import pytest
import torch

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from tests.test_attach import DOWN, _weight, plan  # noqa: F401  (plan: the fixture)
from wisparse_compile.planned import thresholds_of
from wisparse_compile.runtime import ThresholdFeed, WeightLayoutChanged


def test_threshold_feed_resolves_once_per_weights_and_plan(plan):
    """The compiled wrapper's feed: same tensors step to step; a plan swap, other weights or an
    unplanned weight are noticed at the next call."""
    a, b = wsc.attach(tiny_llama(), plan), wsc.attach(tiny_llama(seed=1), plan)
    names = plan.names[:3]
    unplanned_calls = []
    feed = ThresholdFeed([1, 3, 5], [plan.channel_thresholds[n] for n in names], lambda: unplanned_calls.append(1))

    def args_of(model):
        return ["x", _weight(model, names[0]), "y", _weight(model, names[1]), "z", _weight(model, names[2])]

    first = feed(args_of(a))
    assert all(t is thresholds_of(_weight(a, n)) for t, n in zip(first, names))
    again = feed(args_of(a))
    assert again is first and all(x is y for x, y in zip(again, first))
    other = feed(args_of(b))  # another instance, same graph
    assert all(t is thresholds_of(_weight(b, n)) for t, n in zip(other, names))

    swapped = wsc.calibrate(tiny_llama(), token_batches(1), wsc.SparsityConfig(sparsity=0.3, method="teal"))
    wsc.attach(b, swapped)
    after_swap = feed(args_of(b))
    assert all(torch.equal(t, swapped.channel_thresholds[n]) for t, n in zip(after_swap, names))

    assert unplanned_calls == []
    wsc.detach(b)
    dense = feed(args_of(b))
    assert all(torch.count_nonzero(t) == 0 for t in dense) and unplanned_calls == [1]
    assert all(x is y for x, y in zip(feed(args_of(b)), dense))  # the same zeros each call

    single = ThresholdFeed([0], [plan.channel_thresholds[names[0]]], lambda: None)
    assert single([_weight(a, names[0])])[0] is thresholds_of(_weight(a, names[0]))


def test_threshold_feed_lets_a_deleted_model_go(plan):
    """The feed holds the weights it resolved last only while their model lives."""
    import gc
    import weakref

    model = wsc.attach(tiny_llama(), plan)
    feed = ThresholdFeed([0], [plan.channel_thresholds[DOWN]], lambda: None)
    feed([_weight(model)])
    weight = weakref.ref(_weight(model))
    del model
    gc.collect()
    assert weight() is None


def test_threshold_feed_refuses_a_weight_of_another_layout(plan):
    """A weight re-laid under a graph compiled without module guards raises instead of running wrong."""
    model = wsc.attach(tiny_llama(), plan)
    weight = _weight(model)
    feed = ThresholdFeed([0], [plan.channel_thresholds[DOWN]], lambda: None, compiled_weights=[weight])
    assert feed([weight])[0] is thresholds_of(weight)
    wsc.detach(model)  # lays the weight back row-major: other strides
    with pytest.raises(WeightLayoutChanged, match="torch._dynamo.reset"):
        feed([weight])
