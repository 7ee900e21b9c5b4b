"""Appendix C model: closed forms vs numerics, admissibility, mean-field loss, FGSM, figures."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy import optimize, special

from analysis import theory as T
from robustlogits.core.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _v(z: np.ndarray, beta: float) -> np.ndarray:
    """Perturbation part of a surrogate vector whose top class is index 0."""
    v = z.copy()
    v[0] -= beta
    return v


def _permute(z: np.ndarray, label: int, rng) -> tuple[np.ndarray, int, int]:
    """Move the classes around so index-0 conventions can't hide a bug."""
    perm = rng.permutation(z.size)
    out = np.empty_like(z)
    out[perm] = z
    return out, int(perm[label]), int(perm[0])


# ----------------------------------------------------------------------------- expansion (3)


@pytest.mark.parametrize("n_classes,label", [(3, 0), (10, 0), (10, 1), (100, 1)])
def test_truncated_loss_is_a_third_order_expansion(n_classes, label):
    """Error of (3) against the exact loss must shrink like t^4 (t^3 if the cubic were wrong)."""
    rng = np.random.default_rng(n_classes)
    beta = 1.3
    v = rng.normal(size=n_classes)
    v[0] = 0.0
    z0 = beta * np.eye(n_classes)[0]

    def err(t):
        exact = special.logsumexp(z0 + t * v) - (z0 + t * v)[label]
        return abs(exact - T.truncated_loss(t * v, beta, label))

    ratio = err(0.04) / err(0.02)
    assert 13.0 < ratio < 19.0, ratio
    assert err(0.02) < 1e-5


def test_analytic_gradient_and_hessian_match_finite_differences():
    rng = np.random.default_rng(0)
    c, beta, label, h = 7, 0.8, 2, 1e-5
    v = rng.normal(size=c)
    grad = T.truncated_gradient(v, beta, label)
    hess = T.truncated_hessian(v, beta)
    eye = np.eye(c)
    fd_grad = np.array(
        [(T.truncated_loss(v + h * e, beta, label) - T.truncated_loss(v - h * e, beta, label)) / (2 * h) for e in eye]
    )
    fd_hess = np.array(
        [
            (T.truncated_gradient(v + h * e, beta, label) - T.truncated_gradient(v - h * e, beta, label)) / (2 * h)
            for e in eye
        ]
    )
    np.testing.assert_allclose(grad, fd_grad, atol=1e-8)
    np.testing.assert_allclose(hess, fd_hess, atol=1e-8)
    u = rng.normal(size=(c, 3))
    np.testing.assert_allclose(T.truncated_hessian_product(v, beta, u), hess @ u, atol=1e-12)


# ----------------------------------------------------------------------------- stationary points


@pytest.mark.parametrize("n_classes", [3, 10, 100])
def test_closed_forms_agree_with_numerical_search(n_classes):
    """Same set of stationary points both ways: 2 (or 0) for correct, 4 for misclassified."""
    upper = math.log(2 * (n_classes - 1))
    for beta in (upper - 2.0, upper - 0.3):
        found = T.numerical_stationary_points(beta, n_classes, correct=True)[:, 0]
        closed = np.sort(np.ravel(T.f_branches(beta, n_classes)))
        assert found.size == 2
        np.testing.assert_allclose(np.sort(found), closed, rtol=1e-8, atol=1e-8)
    beyond = T.numerical_stationary_points(upper + 0.3, n_classes, correct=True)
    assert beyond.size == 0
    assert np.isnan(np.ravel(T.f_branches(upper + 0.3, n_classes))).all()

    thr = math.log(n_classes - 1)
    for beta in (1.0, thr + 0.5, thr + 1.5):
        found = T.numerical_stationary_points(beta, n_classes, correct=False)
        closed = np.array([np.r_[T.g_psi(beta, n_classes, b)] for b in T.WRONG_BRANCHES])
        assert len(found) == 4, (beta, found)
        for point in closed:
            assert np.abs(found - point).max(1).min() < 1e-7 * (1 + np.abs(point).max())


def test_stationary_points_have_zero_gradient_and_printed_forms_do_not():
    rng = np.random.default_rng(3)
    for c in (3, 10, 100):
        for beta in np.linspace(-1.0, 8.0, 19):
            cases = [(True, b) for b in T.CORRECT_BRANCHES] + [(False, b) for b in T.WRONG_BRANCHES]
            for correct, branch in cases:
                z, label = T.surrogate_logits(beta, c, correct, branch)
                if not np.isfinite(z).all():
                    continue  # f does not exist above ln(2(C-1)); poles
                zp, lab, top = _permute(z, label, rng)
                v = zp.copy()
                v[top] -= beta
                grad = np.delete(T.truncated_gradient(v, beta, lab, top), top)
                scale = 1.0 + np.abs(v).max() ** 2
                assert np.abs(grad).max() < 1e-11 * scale, (c, beta, correct, branch)
    # the printed f_+ is not a stationary point of (3)
    beta, c = 1.5, 10
    v = np.r_[0.0, np.full(c - 1, T.printed_f(beta, c)[()])]
    assert np.abs(T.truncated_gradient(v, beta, 0)[1:]).max() > 1e-2


def test_minimising_the_truncated_loss_recovers_f_plus():
    c = 10
    for beta in (0.5, 1.5, 2.5):
        minima = T.minimise_correct_truncated(beta, c)
        f_plus = T.f_branches(beta, c)[0][()]
        assert minima.size == 1 and abs(minima[0] - f_plus) < 1e-6
    assert T.minimise_correct_truncated(math.log(2 * (c - 1)) + 0.2, c).size == 0
    # below ln(C-1) f_+ is a minimum of (3) in the full constrained space, so an unconstrained
    # minimiser started off-symmetry must come back to it
    beta = 1.0
    rng = np.random.default_rng(1)
    f_plus = T.f_branches(beta, c)[0][()]
    start = f_plus + 0.3 * rng.normal(size=c - 1)
    res = optimize.minimize(
        lambda w: T.truncated_loss(np.r_[0.0, w], beta, 0),
        start,
        jac=lambda w: T.truncated_gradient(np.r_[0.0, w], beta, 0)[1:],
        method="BFGS",
        options={"gtol": 1e-12},
    )
    np.testing.assert_allclose(res.x, f_plus, atol=1e-6)


def test_kind_of_stationary_point():
    c = 10
    for beta, kind in ((1.0, "minimum"), (2.5, "saddle")):  # ln(C-1) = 2.197 separates them
        z, _ = T.surrogate_logits(beta, c, True)
        assert T.stationary_kind(_v(z, beta), beta) == kind
    beta = math.log(c - 1) + 0.5
    z, _ = T.surrogate_logits(beta, c, False)
    assert T.stationary_kind(_v(z, beta), beta, T._ansatz_basis(c, False)) == "maximum"


# ----------------------------------------------------------------------------- admissibility


def test_thresholds_follow_the_derived_class_dependence():
    thresholds = []
    for c in (3, 5, 10, 100, 1000):
        thr, upper = T.misclassified_threshold(c), T.correct_upper_bound(c)
        assert abs(thr - math.log(c - 1)) < 1e-8
        assert abs(upper - math.log(2 * (c - 1))) < 1e-8
        # directly from the vectors: the top class is the max just above thr, not just below
        above, _ = T.surrogate_logits(thr + 1e-3, c, False)
        below, _ = T.surrogate_logits(thr - 1e-3, c, False)
        assert above.argmax() == 0 and above[0] > above[1:].max()
        assert below[1:].max() > below[0]
        thresholds.append(thr)
    assert np.all(np.diff(thresholds) > 0)
    # boundaries that are not poles: the finite '-' root meets beta; psi = 0 needs beta > 0
    c = 10
    ((lo, hi),) = T.admissible_intervals(lambda b: T.wrong_admissible(b, c, "-"))
    assert abs(lo - math.log(c - 3)) < 1e-8  # psi_- pole
    g_hi, psi_hi = T.g_psi(hi, c, "-")
    assert abs(max(g_hi, psi_hi) - hi) < 1e-8
    ((lo0, _),) = T.admissible_intervals(lambda b: T.wrong_admissible(b, c, "0-"))
    assert abs(lo0) < 1e-9
    assert T.misclassified_threshold(10) < T.PAPER_THRESHOLD < T.misclassified_threshold(100)


# ----------------------------------------------------------------------------- loss, FGSM


def test_exact_loss_at_surrogates_matches_direct_evaluation():
    rng = np.random.default_rng(5)
    for c in (3, 10, 100):
        for beta in np.linspace(0.0, 9.0, 37):
            for correct, admissible in ((True, T.correct_admissible), (False, T.wrong_admissible)):
                closed = T.surrogate_loss(beta, c, correct)[()]
                if not admissible(beta, c)[()]:
                    assert np.isnan(closed)
                    continue
                z, label = T.surrogate_logits(beta, c, correct)
                zp, lab, _ = _permute(z, label, rng)
                direct = special.logsumexp(zp) - zp[lab]
                assert abs(closed - direct) < 1e-10 * (1 + direct)
    bc, bw, eps = 2.0, 3.0, 0.25
    expected = 0.75 * T.surrogate_loss(bc, 10, True) + 0.25 * T.surrogate_loss(bw, 10, False)
    assert abs(T.mean_field_loss(bc, bw, 10, eps) - expected) < 1e-12
    assert T.mean_field_loss(bc, 1.0, 10, 0.0) == pytest.approx(T.surrogate_loss(bc, 10, True))


@pytest.mark.parametrize("n_classes", [3, 10, 50])
def test_gap_change_matches_eq8_summed_over_a_surrogate_training_set(n_classes):
    rng = np.random.default_rng(n_classes)
    bc = math.log(2 * (n_classes - 1)) - 0.4
    bw, eps, oc, ow = math.log(n_classes - 1) + 0.8, 0.2, 0.7, 1.3
    zc, lc = T.surrogate_logits(bc, n_classes, True)
    zw, lw = T.surrogate_logits(bw, n_classes, False)
    n_c, n_w = 12, 5
    train = [_permute(zc, lc, rng)[0] for _ in range(n_c)] + [_permute(zw, lw, rng)[0] for _ in range(n_w)]
    omegas = np.r_[np.full(n_c, (1 - eps) * oc / n_c), np.full(n_w, eps * ow / n_w)]
    direct = T.fgsm_gap_change_direct(np.array(train), omegas)
    closed = T.gap_change(bc, bw, n_classes, eps, oc, ow)
    assert closed < 0
    assert abs(direct - closed) < 1e-9 * abs(closed)
    g, psi = T.g_psi(bw, n_classes)
    m = n_classes - 2
    missing = 2 * m / (m + 1) * eps * ow * (g - psi) ** 2
    printed = T.gap_change_printed(bc, bw, n_classes, eps, oc, ow)
    assert abs((printed - closed) - missing) < 1e-9 * abs(closed)
    rel = T.relative_gap_change(bc, bw, n_classes, eps, oc, ow)
    assert abs(rel - abs(closed) / (bc - T.f_branches(bc, n_classes)[0])) < 1e-12


# ----------------------------------------------------------------------------- outputs


def test_run_theory_writes_figures_and_json(tmp_path):
    start = time.perf_counter()
    summary = T.write_theory_figures(tmp_path / "out", class_counts=(10, 100), grid=(0.0, 10.0, 41))
    assert time.perf_counter() - start < 15
    for key in ("c1", "c2", "c3"):
        data = open(summary["files"][key], "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000
    on_disk = json.loads(open(summary["files"]["json"]).read())
    assert on_disk == json.loads(json.dumps(summary))
    for c in (10, 100):
        s = on_disk["class_counts"][str(c)]
        assert s["misclassified_threshold"] == pytest.approx(math.log(c - 1), abs=1e-5)
        assert s["checks"]["max_abs_closed_minus_numeric"] < 1e-6
        assert s["checks"]["max_constrained_gradient_at_closed_form"] < 1e-9
        grid_min = s["loss_surface_grid_min"]
        assert grid_min["beta_wrong"] > s["misclassified_threshold"]
        assert grid_min["beta_correct"] <= s["correct_upper_bound"]


def test_place_empirical_measures_against_the_threshold(tmp_path):
    c = 10
    thr, upper = math.log(c - 1), math.log(2 * (c - 1))
    # misclassified rows: top logit (class 0) at chosen values, label 1; correct rows: label 0
    wrong_max = np.array([1.0, 2.0, 3.0, 4.0])
    right_max = np.array([2.0, 2.5, 5.0])
    tops = np.r_[wrong_max, right_max]
    logits = np.zeros((tops.size, c))
    logits[:, 0] = tops
    logits[:, 1] = tops - 0.5
    labels = np.r_[np.ones(wrong_max.size, int), np.zeros(right_max.size, int)]
    res = T.place_empirical(logits, labels, tmp_path / "one.png", label="AT")
    m = res["models"]["AT"]
    assert res["misclassified_threshold"] == pytest.approx(thr, abs=1e-6)
    assert m["accuracy"] == pytest.approx(3 / 7)
    assert m["mean_max_logit_misclassified"] == pytest.approx(2.5)
    assert m["mean_max_logit_misclassified_minus_threshold"] == pytest.approx(2.5 - thr, abs=1e-6)
    assert m["fraction_misclassified_above_threshold"] == pytest.approx(np.mean(wrong_max > thr))
    assert m["fraction_correct_within_upper_bound"] == pytest.approx(np.mean(right_max <= upper))
    assert m["mean_gap_misclassified"] == pytest.approx(0.5)
    assert m["mean_max_logit_minus_paper_3.5"] == pytest.approx(tops.mean() - 3.5)
    assert (tmp_path / "one.png").read_bytes().startswith(PNG_MAGIC)

    rng = np.random.default_rng(0)
    st = rng.normal(size=(200, c)) + 8 * np.eye(c)[rng.integers(0, c, 200)]
    both = T.place_empirical([(logits, labels, "AT"), (st, st.argmax(1), "ST")], None, tmp_path / "both.png")
    assert set(both["models"]) == {"AT", "ST"} and both["models"]["ST"]["accuracy"] == 1.0
    assert both["models"]["ST"]["fraction_misclassified_above_threshold"] is None


def test_bad_input_raises_user_error(tmp_path):
    ok_logits, ok_labels = np.zeros((4, 10)), np.zeros(4, int)
    bad_calls = [
        lambda: T.f_branches(1.0, 2),
        lambda: T.g_psi(1.0, 10, "x"),
        lambda: T.f_branches(np.nan, 10),
        lambda: T.mean_field_loss(1.0, 3.0, 10, 1.5),
        lambda: T.gap_change(1.0, 3.0, 10, -0.1),
        lambda: T.write_theory_figures(tmp_path, class_counts=(2,)),
        lambda: T.write_theory_figures(tmp_path, error_rate=float("nan")),
        lambda: T.write_theory_figures(tmp_path, omega_wrong=-1.0),
        lambda: T.write_theory_figures(tmp_path, grid=(5.0, 1.0, 10)),
        lambda: T.place_empirical(ok_logits, np.zeros(3, int), tmp_path / "a.png"),
        lambda: T.place_empirical(np.full((4, 10), np.nan), ok_labels, tmp_path / "a.png"),
        lambda: T.place_empirical(np.zeros((4, 2)), ok_labels, tmp_path / "a.png"),
        lambda: T.place_empirical(ok_logits, np.full(4, 10), tmp_path / "a.png"),
        lambda: T.place_empirical(ok_logits, np.full(4, 0.5), tmp_path / "a.png"),
        lambda: T.place_empirical(
            [(ok_logits, ok_labels, "a"), (np.zeros((4, 5)), ok_labels, "b")], None, tmp_path / "a.png"
        ),
    ]
    for call in bad_calls:
        with pytest.raises(UserError):
            call()
    assert not (tmp_path / "a.png").exists()
