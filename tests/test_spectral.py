"""Pure spectral functions against hand-computed and planted cases."""

import math

import numpy as np
import pytest
import torch

from posttrain.analysis import spectral as sp
from posttrain.analysis.factors import gram, gram_factors, svd_factors, tall


def orthonormal(m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return q


def rotated(Q, col, toward, theta):
    """Q with column `col` turned by `theta` toward the unit vector `toward` (orthogonal to span(Q))."""
    out = Q.clone()
    out[:, col] = math.cos(theta) * Q[:, col] + math.sin(theta) * toward
    return out


@pytest.mark.parametrize("theta", [1e-7, 1e-3, 0.3, math.pi / 4, 1.2, math.pi / 2])
def test_principal_angles_of_a_planted_rotation(theta):
    Q = orthonormal(50, 6)
    basis = orthonormal(50, 7, seed=1)
    extra = basis[:, 6] - Q @ (Q.T @ basis[:, 6])  # a direction orthogonal to span(Q)
    extra = extra / extra.norm()
    B = rotated(Q, 2, extra, theta)
    th = sp.principal_angles(Q, B)
    assert th.shape == (6,)
    assert torch.allclose(th[:-1], torch.zeros(5, dtype=torch.float64), atol=1e-7)
    # the sine branch keeps tiny angles exact (arccos alone would give ~1e-8 noise at best)
    assert float(th[-1]) == pytest.approx(theta, rel=1e-8, abs=1e-12)
    # the cosine-only variant agrees where arccos is well conditioned
    if theta > 1e-3:
        assert float(sp.angles_from_cosines(Q.T @ B)[-1]) == pytest.approx(theta, abs=1e-7)
    # projection distance and alignment from their definitions
    P = Q @ Q.T - B @ B.T
    assert sp.projection_distance(th) == pytest.approx(float(torch.linalg.matrix_norm(P)), abs=1e-10)
    assert sp.projection_distance(th) == pytest.approx(math.sqrt(2) * math.sin(theta), abs=1e-12)
    assert sp.subspace_alignment(th) == pytest.approx(float((Q.T @ B).pow(2).sum()) / 6, abs=1e-12)


def test_principal_angles_two_rotations_and_batches():
    Q = orthonormal(40, 5)
    outside = orthonormal(40, 10, seed=3)
    outside = outside - Q @ (Q.T @ outside)
    e1 = outside[:, 0] / outside[:, 0].norm()
    e2 = outside[:, 1] - e1 * (e1 @ outside[:, 1])
    e2 = e2 / e2.norm()
    B = rotated(rotated(Q, 0, e1, 0.2), 4, e2, 0.5)
    th = sp.principal_angles(Q, B)
    assert th.tolist() == pytest.approx([0, 0, 0, 0.2, 0.5], abs=1e-8)
    batched = sp.principal_angles(torch.stack([Q, Q]), torch.stack([B, Q]))
    assert batched.shape == (2, 5)
    assert batched[0].tolist() == pytest.approx(th.tolist(), abs=1e-8)
    assert batched[1].abs().max() < 1e-7


def test_energy_split_in_span():
    C = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
    assert sp.energy_split_in_span(torch.diagonal(C), float(C.pow(2).sum())) == pytest.approx((1.0, 0.0))
    C = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert sp.energy_split_in_span(torch.diagonal(C), float(C.pow(2).sum())) == pytest.approx((0.0, 1.0))
    C = torch.tensor([[3.0, 0.0], [4.0, 0.0]])  # 9 on the diagonal, 16 off it
    assert sp.energy_split_in_span(torch.diagonal(C), 25.0) == pytest.approx((0.36, 0.64))
    assert all(math.isnan(x) for x in sp.energy_split_in_span(torch.zeros(2), 0.0))
    # the reference's normalisation: the same C inside a dW with 75 more energy outside the span
    assert sp.energy_split(torch.diagonal(C), 25.0, 100.0) == pytest.approx((0.09, 0.16))


def test_stable_and_effective_rank_hand_computed():
    s = torch.tensor([2.0, 1.0, 1.0])
    assert sp.stable_rank(s) == pytest.approx(6 / 4)
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, exp(H) = 2^1.5
    assert sp.effective_rank(s) == pytest.approx(2**1.5)
    assert sp.effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert sp.effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert math.isnan(sp.stable_rank(torch.zeros(3))) and math.isnan(sp.effective_rank(torch.zeros(3)))


def test_sv_relative_change_and_k():
    rel = sp.sv_relative_change(torch.tensor([4.0, 2.0, 0.0]), torch.tensor([5.0, 1.0, 1.0]))
    assert rel[:2].tolist() == pytest.approx([0.25, -0.5]) and math.isnan(rel[2])
    assert sp.top_k(896, 0.05) == 45 and sp.top_k(20, 0.05) == 1 and sp.top_k(3, 1.0) == 3 and sp.top_k(10, 0.1) == 1


@pytest.mark.parametrize("r,bins", [(896, 20), (45, 20), (7, 20), (100, 1), (33, 4)])
def test_bin_starts_cover_top_and_bottom(r, bins):
    starts, w = sp.bin_starts(r, bins)
    assert len(starts) == min(bins, r) and w >= 1
    assert starts[0] == 0 and starts[-1] + w == r
    covered = set()
    for s in starts:
        covered.update(range(s, s + w))
    assert covered == set(range(r))


def esd_reference(evals, min_eval=1e-5):
    """Clauset et al. / WeightWatcher fit written straight from the formulas, one candidate at a time."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > min_eval]
    N = len(x)
    best = (np.inf, None, None)
    for i in range(N - 1):
        n = N - i
        alpha = 1 + n / np.sum(np.log(x[i:] / x[i]))
        D = 1.0
        if alpha > 1:
            D = np.max(np.abs(np.arange(n) / n - (1 - (x[i:] / x[i]) ** (1 - alpha))))
        if D < best[0]:
            best = (D, alpha, x[i])
    return best


@pytest.mark.parametrize("seed", range(6))
def test_esd_powerlaw_matches_the_plain_scan(seed):
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(60, 400)), int(rng.integers(30, 300))
    W = rng.standard_normal((m, n)) * 0.02
    if seed % 2:
        W = W @ np.diag(rng.pareto(1.5, n) + 1)  # heavy-tailed spectrum
    ev = np.linalg.svd(W, compute_uv=False) ** 2
    D, alpha, xmin = esd_reference(ev)
    fit = sp.esd_powerlaw(torch.tensor(ev))
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.xmin == xmin and fit.D == pytest.approx(D, abs=1e-12)


def test_esd_powerlaw_recovers_a_pareto_exponent_and_rejects_tiny_inputs():
    rng = np.random.default_rng(0)
    x = rng.pareto(1.5, 5000) + 1  # density ~ x^-2.5
    assert sp.esd_powerlaw(x, min_eval=0).alpha == pytest.approx(2.5, abs=0.1)
    assert math.isnan(sp.esd_powerlaw(np.ones(5)).alpha)
    assert math.isnan(sp.esd_powerlaw(np.full(50, 1e-9)).alpha)  # all below the eigenvalue floor


def test_gram_and_factorisations_agree():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(700, 300, generator=g, dtype=torch.float64)
    assert torch.allclose(gram(A), A.T @ A, atol=1e-10)
    assert torch.equal(gram(A), gram(A).T)
    f_svd, f_gram = svd_factors(A), gram_factors(gram(A))
    assert torch.allclose(f_svd.S, f_gram.S, rtol=1e-9)
    # singular vectors up to sign
    assert torch.allclose((f_svd.V * f_gram.V).sum(0).abs(), torch.ones(300, dtype=torch.float64), atol=1e-6)
    t, transposed = tall(A.T)
    assert transposed and t.shape == (700, 300)
    # randomised top-k on a spectrum with a gap after k
    U, V = orthonormal(400, 20, 5), orthonormal(300, 20, 6)
    s = torch.cat([torch.linspace(10, 5, 8), torch.linspace(0.1, 0.01, 12)]).double()
    W = U @ torch.diag(s) @ V.T
    f = svd_factors(W, rank=8)
    assert not f.complete and f.S.shape == (8,)
    assert torch.allclose(f.S, s[:8], rtol=1e-8)
    assert float(sp.principal_angles(f.U, U[:, :8]).max()) < 1e-6


def test_principal_angles_near_90_degrees_and_cosines_rounded_past_one():
    # k == l: angles above 45 degrees come from arccos; the sine of 89.99 degrees rounds to 1 in float32
    th = math.radians(89.99)
    A = torch.tensor([[1.0], [0.0], [0.0]])
    B = torch.tensor([[math.cos(th)], [math.sin(th)], [0.0]])
    assert sp.principal_angles(A, B).item() == pytest.approx(th, abs=1e-5)
    # k != l: a column of A against A itself; its cosine comes out as 1.0000001 in float32
    Q, _ = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)))
    assert torch.linalg.svdvals(Q.T @ Q[:, :1]).max() > 1.0
    assert sp.principal_angles(Q, Q[:, :1]).tolist() == [0.0]
    # and an angle between a plane and a line, from the cosine: 60 degrees
    line = torch.tensor([[0.5], [0.0], [math.sqrt(3) / 2]])
    assert sp.principal_angles(torch.eye(3)[:, :2], line).item() == pytest.approx(math.pi / 3, abs=1e-6)


def test_effective_rank_and_in_span_split_bounds():
    assert sp.effective_rank(torch.tensor([0.5, 0.5])) == pytest.approx(2.0)  # a total below 1 is fine
    assert math.isnan(sp.effective_rank(torch.zeros(3)))
    # a pure scaling whose ||C||^2 came out a hair below sum C_ii^2: the diagonal share stays 1
    assert sp.energy_split_in_span(torch.tensor([1.0, 2.0]), 4.999999) == (1.0, 0.0)


def test_ks_distance_on_a_strided_tail_by_the_definition():
    from posttrain.analysis.spectral import _ks_distance

    g = torch.Generator().manual_seed(2)
    x = torch.sort(torch.rand(9, generator=g, dtype=torch.float64) + 0.5).values
    logx, alphas, N = x.log(), torch.full((9,), 2.5, dtype=torch.float64), 9
    idx = torch.tensor([0, 3])

    def direct(i, stride):
        js = sorted({min(i + s, N - 1) for s in range(0, N, stride)} | {N - 1})
        return max(abs((j - i) / (N - i) - (1 - (x[j] / x[i]) ** (1 - 2.5))) for j in js)

    for stride in (1, 2, 4):
        got = _ks_distance(logx, alphas, idx, N, stride)
        assert got.tolist() == pytest.approx([float(direct(0, stride)), float(direct(3, stride))], rel=1e-12)
    # the strided maximum skips the point that decides the exact one here
    assert _ks_distance(logx, alphas, idx, N, 2)[0] < _ks_distance(logx, alphas, idx, N, 1)[0]


def test_stable_rank_below_one_and_of_nothing():
    assert sp.stable_rank(torch.tensor([0.5, 0.5])) == pytest.approx(2.0)  # (0.25 + 0.25) / 0.25
    assert math.isnan(sp.stable_rank(torch.zeros(2))) and math.isnan(sp.stable_rank(torch.tensor([])))


def test_esd_powerlaw_input_cleaning_and_size_limits():
    rng = np.random.default_rng(1)
    x = rng.pareto(1.5, 40) + 1
    fit = sp.esd_powerlaw(x)
    # non-finite values and values at the floor (<= min_eval) are dropped before the fit
    assert sp.esd_powerlaw(np.concatenate([x, [np.inf, np.nan, 1e-5, 0.0]])) == fit
    # a float32 spectrum is fitted in float64: the same fit as its float64 copy
    x32 = torch.tensor(x, dtype=torch.float32)
    assert sp.esd_powerlaw(x32) == sp.esd_powerlaw(x32.double())
    # min_n = 10 eigenvalues are enough, 9 are not
    assert math.isfinite(sp.esd_powerlaw(x[:10]).alpha) and math.isnan(sp.esd_powerlaw(x[:9]).alpha)
    assert math.isnan(sp.esd_powerlaw(np.append(x[:9], 1e-5)).alpha)  # a value at the floor does not count
    # two points fit when allowed: alpha = 1 + 2 / ln(4 / 1)
    two = sp.esd_powerlaw(np.array([1.0, 4.0]), min_n=2)
    assert two.alpha == pytest.approx(1 + 2 / math.log(4)) and two.xmin == 1.0 and two.n_tail == 2
    # a tail whose log-sum is below 1 still fits: 1 + 2 / ln 2
    assert sp.esd_powerlaw(np.array([1.0, 2.0]), min_n=2).alpha == pytest.approx(1 + 2 / math.log(2))


def test_esd_powerlaw_with_exactly_one_batch_of_candidates():
    # 33 eigenvalues: 32 candidates xmin, one full batch of the exact scan, then the scan stops
    x = np.random.default_rng(2).pareto(1.5, 33) + 1
    fit = sp.esd_powerlaw(x)
    D, alpha, xmin = esd_reference(x)
    assert fit.alpha == pytest.approx(alpha, rel=1e-10) and fit.xmin == xmin
    assert fit.n_tail == int((x >= xmin).sum())
