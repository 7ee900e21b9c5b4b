"""Validation of the MFTMA core (robustlogits.core.mftma) against theory and simulation.

Tolerances are stated in each test's name/docstring; sizes are small so the file runs in
well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import integrate, optimize

from robustlogits.core.errors import UserError
from robustlogits.core.mftma import (
    alpha_ball,
    alpha_point,
    anchor_points,
    center_correlation,
    manifold_analysis,
    simulated_capacity,
)

# ----------------------------------------------------------------------------- helpers


def random_manifolds(P, N, M, radius, seed=0, dim=None):
    """Gaussian centres (norm ~1) plus Gaussian point clouds of the given radius."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((P, N, 1)) / math.sqrt(N)
    dim = dim or M
    axes = rng.standard_normal((P, N, dim)) / math.sqrt(N)
    coef = rng.standard_normal((P, dim, M)) / math.sqrt(dim)
    return centres + radius * axes @ coef


def fibonacci_sphere(M):
    i = np.arange(M) + 0.5
    polar = np.arccos(1 - 2 * i / M)
    azim = math.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(azim) * np.sin(polar), np.sin(azim) * np.sin(polar), np.cos(polar)], axis=1)


def spheres(R, D, M, P=4, N=48, seed=0):
    """P spheres of radius R (relative to centre norm 1) in mutually orthogonal subspaces.

    Centres come in +/- pairs so the global centroid is exactly 0 and every centre stays
    orthogonal to every sphere: the idealised geometry alpha_Ball describes.
    """
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    if D == 2:
        a = 2 * np.pi * np.arange(M) / M
        pts = np.stack([np.cos(a), np.sin(a)], axis=1)
    elif D == 3:
        pts = fibonacci_sphere(M)
    else:
        raise ValueError(D)
    X = np.zeros((P, N, M))
    for p in range(P):
        c = (1 if p % 2 == 0 else -1) * Q[:, p // 2]
        basis = Q[:, P // 2 + p * D : P // 2 + (p + 1) * D]
        X[p] = c[:, None] + R * basis @ pts.T
    return X


# ----------------------------------------------------------------------------- closed forms


def test_alpha_point_closed_form_matches_quadrature_to_1e8():
    for k in (-1.0, 0.0, 0.5, 2.0):
        inv, _ = integrate.quad(lambda t, k=k: (k - t) ** 2 * math.exp(-t * t / 2) / math.sqrt(2 * math.pi), -np.inf, k)
        assert alpha_point(k) == pytest.approx(1 / inv, rel=1e-8)
    assert alpha_point(0.0) == pytest.approx(2.0, rel=1e-12)
    np.testing.assert_allclose(alpha_point(np.array([0.0, 1.0])), [2.0, alpha_point(1.0)])


def test_alpha_ball_exact_limits_and_self_dual_cone_to_1e6():
    """R -> 0 gives alpha_point; R = 1 is the self-dual Lorentz cone, where alpha = 2/(D+1) exactly."""
    assert alpha_ball(1e-9, 5, exact=True) == pytest.approx(2.0, rel=1e-6)
    assert alpha_ball(0.0, 5, kappa=0.7, exact=True) == pytest.approx(alpha_point(0.7), rel=1e-9)
    for D in (1, 2, 3, 10):
        assert alpha_ball(1.0, D, exact=True) == pytest.approx(2.0 / (D + 1), rel=1e-6)
    # the paper's large-D form converges to the exact one (within 0.3% at D = 200)
    for R in (0.05, 0.1, 0.3):
        assert alpha_ball(R, 200) == pytest.approx(alpha_ball(R, 200, exact=True), rel=3e-3)
    with pytest.raises(UserError):
        alpha_ball(-1.0, 3)


# ----------------------------------------------------------------------------- the anchor QP


def _slsqp_F(S, Tp):
    """Reference: the primal QP min ||V - T'||^2 s.t. S V >= 0 by SLSQP, one sample."""
    res = optimize.minimize(
        lambda v: np.sum((v - Tp) ** 2),
        Tp.copy(),
        jac=lambda v: 2 * (v - Tp),
        constraints=[{"type": "ineq", "fun": lambda v: S @ v, "jac": lambda v: S}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    return float(np.sum((res.x - Tp) ** 2))


@pytest.mark.parametrize("kappa", [0.0, 0.4])
def test_anchor_qp_matches_slsqp_1e6_and_nnls_1e9(kappa):
    rng = np.random.default_rng(3)
    P, M, D, n = 3, 15, 6, 40
    pts = rng.standard_normal((P, M, D)) * np.array([0.3, 1.0, 2.5])[:, None, None]
    T = rng.standard_normal((P, n, D + 1))
    sol = anchor_points(pts, T, kappa)
    assert set(np.unique(sol.regime)) == {0, 1, 2}  # all three regimes exercised
    assert sol.max_kkt_violation < 1e-9
    for p in range(P):
        S = np.concatenate([pts[p], np.ones((M, 1))], axis=1)
        for k in range(n):
            Tp = T[p, k].copy()
            Tp[-1] -= kappa
            lam, _ = optimize.nnls(-S.T, Tp)
            F_nnls = float(np.sum((S.T @ lam) ** 2))
            assert sol.F[p, k] == pytest.approx(F_nnls, rel=1e-9, abs=1e-9)
            if k < 10:
                assert sol.F[p, k] == pytest.approx(_slsqp_F(S, Tp), rel=1e-6, abs=1e-7)
            # the anchor reproduces F through the closed form [kappa - t0 - t.s]_+^2 / (1 + |s|^2)
            s = sol.anchors[p, k]
            closed = max(kappa - T[p, k, -1] - T[p, k, :D] @ s, 0.0) ** 2 / (1 + s @ s)
            assert closed == pytest.approx(sol.F[p, k], rel=1e-8, abs=1e-10)


# ----------------------------------------------------------------------------- capacity vs theory


def test_point_manifolds_capacity_2_within_1pct():
    X = np.random.default_rng(0).standard_normal((10, 40, 1))
    res = manifold_analysis(X, kappa=0.0, n_t=2000)
    assert res.mean_capacity == pytest.approx(2.0, rel=0.01)
    np.testing.assert_array_equal(res.radius, 0.0)
    np.testing.assert_array_equal(res.dimension, 0.0)
    for k in (0.5, 1.0):
        assert manifold_analysis(X, kappa=k, n_t=2000).mean_capacity == pytest.approx(alpha_point(k), rel=0.01)


@pytest.mark.parametrize(
    "R,D,M,kappa",
    [(0.5, 2, 90, 0.0), (1.0, 2, 90, 0.0), (1.0, 3, 300, 0.0), (0.5, 2, 90, 0.5)],
)
def test_spheres_match_exact_alpha_ball_within_2pct(R, D, M, kappa):
    """Sampled spheres vs alpha_Ball(R, D) (exact chi_D integral); also R_M <= R within 5%, D_M = D within 2%."""
    res = manifold_analysis(spheres(R, D, M), kappa=kappa, n_t=2000, center_null_space=False, definitions="printed")
    theory = alpha_ball(R, D, kappa, exact=True)
    np.testing.assert_allclose(res.capacity, theory, rtol=0.02)
    assert np.all(res.radius <= R * 1.0001) and np.all(res.radius >= 0.95 * R)
    np.testing.assert_allclose(res.dimension, D, rtol=0.02)
    # the reference's D_M counts min(N, M) coordinates, here the N = 48 ambient ones: D <t^.s^>^2
    # with t^ in 48 dimensions is 48 (E|t_D| / E|t_48|)^2 for a sphere, below D
    ref = manifold_analysis(spheres(R, D, M), kappa=kappa, n_t=2000, center_null_space=False)
    np.testing.assert_array_equal(ref.capacity, res.capacity)
    assert np.all(ref.radius <= res.radius + 1e-12)
    chi_mean = lambda k: math.sqrt(2) * math.exp(math.lgamma((k + 1) / 2) - math.lgamma(k / 2))  # noqa: E731
    np.testing.assert_allclose(ref.dimension, 48 * (chi_mean(D) / chi_mean(48)) ** 2, rtol=0.05)


def test_capacity_close_to_ball_of_RM_DM_within_10pct():
    """A.4.2: alpha_M ~ alpha_Ball(R_M, D_M) for random manifolds."""
    for R in (0.5, 1.0):
        res = manifold_analysis(random_manifolds(16, 200, 10, R), n_t=500, center_null_space=False)
        pred = alpha_ball(res.radius, res.dimension)
        np.testing.assert_allclose(res.capacity, pred, rtol=0.10)


def test_simulated_capacity_agrees_with_mean_field_mft_mildly_above():
    """A.4.3: simulated within 12% of mean field, mean field not below simulation by more than 3%."""
    X = random_manifolds(24, 200, 10, 0.5, seed=0)
    mft = manifold_analysis(X, n_t=500, center_null_space=False).mean_capacity
    sim = simulated_capacity(X, n_dichotomies=61, seed=1)
    assert sim == pytest.approx(mft, rel=0.12)
    assert mft >= 0.97 * sim


def test_simulated_capacity_of_points_near_cover_value_2():
    """P/N_c for points (M=1); Cover's count gives 50% at P = 2N, finite-size tolerance 15%."""
    X = np.random.default_rng(2).standard_normal((40, 100, 1))
    assert simulated_capacity(X, n_dichotomies=41, seed=0) == pytest.approx(2.0, rel=0.15)


def test_correlated_centres_null_space_recovers_simulated_capacity():
    """Centres sharing a 2-D structure: the projection finds K = 2, removes most correlation, and
    null-space MFT lands within 15% of simulation while raw MFT overshoots by > 30%."""
    rng = np.random.default_rng(0)
    P, N, M = 30, 300, 20
    shared = np.linalg.qr(rng.standard_normal((N, 2)))[0]
    centres = 3 * rng.standard_normal((P, 2)) @ shared.T + rng.standard_normal((P, N)) / math.sqrt(N)
    X = centres[:, :, None] + 0.4 * rng.standard_normal((P, N, M)) / math.sqrt(N)
    raw = manifold_analysis(X, center_null_space=False)
    ns = manifold_analysis(X, center_null_space=True)
    sim = simulated_capacity(X, n_dichotomies=41, seed=0)
    assert ns.n_center_components == 2
    assert ns.center_correlation == pytest.approx(raw.center_correlation)
    assert ns.residual_center_correlation < 0.5 * ns.center_correlation
    assert ns.mean_capacity == pytest.approx(sim, rel=0.15)
    assert raw.mean_capacity > 1.3 * sim


def test_random_centres_keep_full_space_with_principal_directions():
    res = manifold_analysis(random_manifolds(20, 200, 8, 0.5), n_t=50, center_method="principal")
    assert res.n_center_components == 0 and res.center_method == "principal"


def test_reference_centre_removal_always_takes_out_at_least_one_direction():
    """As the MFTMA reference code: K >= 1 chosen by the residual correlation, and the shared
    2-D structure of clustered centres found (K = 2) by the subspace optimisation too."""
    res = manifold_analysis(random_manifolds(20, 200, 8, 0.5), n_t=50)
    assert res.n_center_components >= 1 and res.center_method == "reference"
    rng = np.random.default_rng(0)
    P, N = 30, 300
    shared = np.linalg.qr(rng.standard_normal((N, 2)))[0]
    centres = 3 * rng.standard_normal((P, 2)) @ shared.T + rng.standard_normal((P, N)) / math.sqrt(N)
    X = centres[:, :, None] + 0.4 * rng.standard_normal((P, N, 20)) / math.sqrt(N)
    ref = manifold_analysis(X, n_t=50, center_reps=3)
    assert ref.n_center_components == 2 and ref.residual_center_correlation < 0.5 * ref.center_correlation


def test_residual_correlation_gradient_matches_finite_differences():
    from robustlogits.core.mftma import _residual_corr_cost

    rng = np.random.default_rng(0)
    X, A = rng.standard_normal((8, 7)), rng.standard_normal((7, 2))
    numeric = optimize.approx_fprime(A.ravel(), lambda a: _residual_corr_cost(a.reshape(7, 2), X)[0], 1e-7)
    np.testing.assert_allclose(_residual_corr_cost(A, X)[1].ravel(), numeric, atol=1e-5)
    # the cost depends on the subspace only
    B = rng.standard_normal((2, 2))
    assert _residual_corr_cost(A @ B, X)[0] == pytest.approx(_residual_corr_cost(A, X)[0], rel=1e-10)


def test_reference_and_printed_definitions():
    """Printed: R^2 = <|s~|^2>, D = <(t.s^)^2>; reference: R^2 = <|s~ - <s~>|^2>, D = D <t^.s^>^2.
    Capacity does not depend on them."""
    X = random_manifolds(8, 80, 10, 0.8, seed=3)
    ref = manifold_analysis(X, n_t=200, center_null_space=False)
    printed = manifold_analysis(X, n_t=200, center_null_space=False, definitions="printed")
    np.testing.assert_array_equal(ref.capacity, printed.capacity)
    assert np.all(ref.radius <= printed.radius + 1e-12)
    assert not np.allclose(ref.dimension, printed.dimension, rtol=1e-3)
    with pytest.raises(UserError):
        manifold_analysis(X, definitions="nope")
    with pytest.raises(UserError):
        manifold_analysis(X, center_method="nope")


# ----------------------------------------------------------------------------- invariances


def test_scaling_and_translation_leave_everything_unchanged_1e9():
    X = random_manifolds(12, 80, 8, 0.6, seed=4)
    a = manifold_analysis(X, n_t=100)
    b = manifold_analysis(3.7 * X + 5.0, n_t=100)
    for f in ("capacity", "radius", "dimension"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-9)
    assert a.center_correlation == pytest.approx(b.center_correlation, rel=1e-9)


def test_point_order_and_full_repetition_invariant_1e9():
    """The anchor QP sees the convex hull only: permuting or repeating all points changes nothing."""
    X = random_manifolds(12, 80, 8, 0.6, seed=5)
    for definitions in ("reference", "printed"):
        a = manifold_analysis(X, n_t=100, definitions=definitions)
        perm = manifold_analysis(X[:, :, np.random.default_rng(0).permutation(8)], n_t=100, definitions=definitions)
        rep = manifold_analysis(np.concatenate([X, X], axis=2), n_t=100, definitions=definitions)
        for other in (perm, rep):
            # the reference's D_M counts min(N, M) coordinates, so repeating points changes it
            same = ("capacity", "radius") + (("dimension",) if definitions == "printed" or other is perm else ())
            for f in same:
                np.testing.assert_allclose(getattr(a, f), getattr(other, f), rtol=1e-9, atol=1e-12)


def test_duplicating_manifolds():
    """Per-manifold MFT is unchanged (same global centroid), the centre correlation becomes
    (2(P-1) rho + 1)/(2P - 1) exactly, and the simulated capacity collapses to 0 because
    random dichotomies almost always split identical twins."""
    P = 10
    X = random_manifolds(P, 80, 6, 0.5, seed=6)
    XX = np.concatenate([X, X], axis=0)
    a = manifold_analysis(X, n_t=100, center_null_space=False)
    b = manifold_analysis(XX, n_t=100, center_null_space=False)
    np.testing.assert_allclose(b.capacity, np.tile(a.capacity, 2), rtol=1e-9)
    np.testing.assert_allclose(b.radius, np.tile(a.radius, 2), rtol=1e-9)
    assert b.mean_capacity == pytest.approx(a.mean_capacity, rel=1e-9)
    assert b.center_correlation == pytest.approx((2 * (P - 1) * a.center_correlation + 1) / (2 * P - 1), rel=1e-9)
    c = manifold_analysis(XX, n_t=100, center_null_space=True)
    np.testing.assert_allclose(c.capacity[:P], c.capacity[P:], rtol=1e-12)
    assert simulated_capacity(XX, n_dichotomies=21, seed=0) == 0.0
    assert simulated_capacity(X, n_dichotomies=21, seed=0) > 0.3


def test_bigger_manifolds_lower_capacity_and_center_correlation_helper():
    caps = [manifold_analysis(random_manifolds(10, 100, 8, R, seed=7), n_t=100).mean_capacity for R in (0.2, 0.6, 1.5)]
    assert caps[0] > caps[1] > caps[2]
    c = np.random.default_rng(0).standard_normal((5, 30))
    assert center_correlation(np.concatenate([c, c])) > center_correlation(c)


# ----------------------------------------------------------------------------- API


def test_deterministic_given_seed_and_seed_noise_small():
    X = random_manifolds(10, 80, 8, 0.6, seed=8)
    a = manifold_analysis(X, n_t=200, seed=1)
    b = manifold_analysis(X, n_t=200, seed=1)
    np.testing.assert_array_equal(a.capacity, b.capacity)
    caps = [a.mean_capacity] + [manifold_analysis(X, n_t=200, seed=s).mean_capacity for s in (2, 3, 4)]
    assert np.std(caps) < 0.06 * np.mean(caps)  # stratified samples: ~3.5% here (unstratified ~9%)


def test_result_fields_and_to_dict_json():
    X = random_manifolds(6, 40, 5, 0.5, seed=9)
    res = manifold_analysis(X, n_t=50)
    for f in ("capacity", "radius", "dimension"):
        assert getattr(res, f).shape == (6,)
    assert res.mean_capacity == pytest.approx(1 / np.mean(1 / res.capacity))
    assert res.mean_radius == pytest.approx(res.radius.mean())
    assert sum(res.regime_fractions.values()) == pytest.approx(1.0)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["mean_capacity"] == pytest.approx(res.mean_capacity)
    assert len(d["capacity"]) == 6


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 5)),  # wrong ndim
        np.ones((1, 5, 3)),  # P < 2
        np.ones((3, 5, 0)),  # M < 1
        np.full((3, 5, 2), np.nan),  # NaN
        np.array([[[1.0, np.inf]], [[0.0, 1.0]]]),  # inf
        np.ones((3, 5, 2)),  # all centres identical -> no distinct centres
    ],
)
def test_bad_input_raises_user_error(bad):
    with pytest.raises(UserError):
        manifold_analysis(bad, n_t=10)


def test_bad_parameters_raise_user_error():
    X = random_manifolds(4, 10, 3, 0.5)
    with pytest.raises(UserError):
        manifold_analysis(X, n_t=0)
    with pytest.raises(UserError):
        manifold_analysis(X, kappa=float("nan"))
    with pytest.raises(UserError):
        simulated_capacity(X, n_dichotomies=0)
    with pytest.raises(UserError):
        simulated_capacity(np.zeros((1, 3, 3)))
