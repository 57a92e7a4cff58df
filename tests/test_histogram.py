import pytest
import torch

from wisparse_compile.histogram import ExpertHistograms, ScoreHistogram


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


def test_chunked_updates_equal_one_update():
    """Calibration feeds a linear's scores call by call: the counts must not depend on the chunking."""
    chunked, whole = ScoreHistogram(), ScoreHistogram()
    x = torch.rand(1000) * torch.exp(torch.randn(1000))
    x[::7] = 0.0
    for chunk in x.split(137):
        chunked.update(chunk)
    whole.update(x)
    assert torch.equal(chunked.counts, whole.counts) and float(chunked.zeros) == float(whole.zeros) == 143
    assert chunked.total == whole.total == 1000
    assert chunked.threshold(0.5) == whole.threshold(0.5)


def test_expert_histograms_threshold_each_expert_and_pool_the_unseen():
    """Each expert's threshold comes from its own rows; an expert no row reached takes the pooled one."""
    h = ExpertHistograms(3)
    rows = torch.cat([torch.rand(200, 4), 100 * torch.rand(200, 4)])  # expert 0 small, expert 1 large scores
    experts = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    h.update(rows, experts)
    tau = h.threshold(0.5)
    assert tau.shape == (3,) and h.total == 1600
    assert tau[0] == pytest.approx(torch.quantile(rows[:200], 0.5).item(), rel=0.03)
    assert tau[1] == pytest.approx(torch.quantile(rows[200:], 0.5).item(), rel=0.03)
    assert tau[2] == pytest.approx(h.pooled.threshold(0.5))
    assert h.fraction_at_or_below(tau) == pytest.approx((400 + 400 + 0) / 1600, abs=0.01)


def _histc_counts(scores: torch.Tensor, h: ScoreHistogram) -> tuple[torch.Tensor, int]:
    """The counts as the first implementation made them: zeros apart, ``histc`` of the positives' clamped log2."""
    from wisparse_compile import histogram

    scores = scores.float().reshape(-1)
    logs = torch.log2(scores[scores > 0]).clamp_(histogram._LOG2_LOW, histogram._LOG2_HIGH - 1e-6)
    counts = torch.histc(logs, bins=h.num_bins, min=histogram._LOG2_LOW, max=histogram._LOG2_HIGH).double()
    return counts, int((scores == 0).sum())


@pytest.mark.parametrize("bins_per_octave", [4, 64])
def test_bincount_update_equals_histc_at_every_bin_edge(bins_per_octave):
    """The bincount of log2 bin indices counts exactly what ``histc`` counted: scores on every bin edge
    and one ulp either side, zeros, tiny and huge scores, inf, NaN (in the total only)."""
    from wisparse_compile import histogram

    h = ScoreHistogram(bins_per_octave)
    k = torch.arange(h.num_bins + 1, dtype=torch.float64)
    edges = torch.cat([torch.linspace(histogram._LOG2_LOW, histogram._LOG2_HIGH, h.num_bins + 1),
                       (histogram._LOG2_LOW + k / bins_per_octave).float()])
    logs = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([
        torch.exp2(logs.double()).float(), torch.rand(100_000, generator=g) * torch.exp(8 * torch.randn(100_000, generator=g)),
        torch.tensor([0.0, 0.0, 1e-45, 1e-30, 3e38, float("inf"), float("nan")]),
    ])
    for chunk in scores.split(len(scores) // 2 + 1):  # in two calls, as calibration feeds it
        h.update(chunk)
    expected, zeros = _histc_counts(scores, h)
    assert torch.equal(h.counts, expected)
    assert float(h.zeros) == zeros == 2 and h.total == scores.numel()
    assert h.counts.sum() == scores.numel() - zeros - 1  # NaN is in no bin
