import pytest
import torch

from wisparse_compile.histogram import ScoreHistogram


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.75, 0.95])
def test_threshold_matches_exact_quantile(sparsity):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200_000, generator=g).abs() * torch.exp(torch.randn(200_000, generator=g))
    h = ScoreHistogram()
    for chunk in scores.split(30_000):
        h.update(chunk)
    tau = h.threshold(sparsity)
    exact = torch.quantile(scores[:100_000], sparsity).item()
    assert tau == pytest.approx(exact, rel=0.03)
    assert (scores <= tau).float().mean().item() == pytest.approx(sparsity, abs=0.003)
    assert h.fraction_at_or_below(tau) == pytest.approx(sparsity, abs=1e-3)


def test_zeros_and_edges():
    h = ScoreHistogram()
    h.update(torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0]))
    assert h.threshold(0.0) == 0.0
    assert h.threshold(0.4) == 0.0  # zeros alone reach 40%: prune only zeros
    assert 1.0 <= h.threshold(0.6) <= 2.0
    with pytest.raises(ValueError):
        h.threshold(1.0)
    with pytest.raises(ValueError, match="empty"):
        ScoreHistogram().threshold(0.5)


def test_merge_equals_single_update():
    a, b, c = ScoreHistogram(), ScoreHistogram(), ScoreHistogram()
    x = torch.rand(1000)
    a.update(x[:400]); b.update(x[400:]); c.update(x)
    a.merge(b)
    assert torch.equal(a.counts, c.counts) and a.total == c.total
