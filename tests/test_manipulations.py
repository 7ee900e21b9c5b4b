"""Property tests for the logit manipulations (paper Figure 4 / Table 2)."""

import pytest
import torch

from robustlogits.core.errors import UserError
from robustlogits.core.manipulations import (
    MANIPULATIONS,
    correct_fix,
    fix_k_average,
    fix_k_permute,
    hybrid,
    manipulate,
    manipulation_report,
)

C = 10


def _data(n=400, c=C, seed=0):
    """Continuous random targets (no ties) and labels; the teacher is wrong on many rows."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(n, c, generator=g) * 3
    labels = torch.randint(0, c, (n,), generator=g)
    return targets, labels


def _topk_classes(x, k):
    return torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]


def _sorted_rows(x):
    return torch.sort(x, dim=1, descending=True).values


# ------------------------------------------------------------------------- permute


@pytest.mark.parametrize("k", [1, 2, 3, 7, C - 1, C])
def test_permute_keeps_multiset_and_topk(k):
    t, _ = _data()
    out = fix_k_permute(t, k, rng=1)
    assert torch.equal(_sorted_rows(out), _sorted_rows(t))
    top = _topk_classes(t, k)
    assert torch.equal(out.gather(1, top), t.gather(1, top))
    assert torch.equal(_topk_classes(out, k), top)


def test_permute_actually_permutes_and_is_uniform():
    # k=1, C=4: each of the 3 bottom values should land on each bottom class ~1/3 of the time.
    n = 30000
    t = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(n, 1)
    out = fix_k_permute(t, 1, rng=0)
    assert torch.all(out[:, 0] == 3.0)
    assert (out[:, 1:] != t[:, 1:]).any(dim=1).float().mean() > 0.7  # 5/6 expected
    for cls in (1, 2, 3):
        for val in (2.0, 1.0, 0.0):
            frac = (out[:, cls] == val).float().mean().item()
            assert abs(frac - 1 / 3) < 0.02, (cls, val, frac)
    # all 6 permutations occur
    assert len({tuple(r) for r in out[:, 1:].tolist()}) == 6


def test_permute_rows_are_independent():
    t = torch.arange(C, dtype=torch.float32).repeat(50, 1)
    out = fix_k_permute(t, 1, rng=3)
    assert len({tuple(r) for r in out.tolist()}) > 40


def test_permute_seeding():
    t, lab = _data()
    a = fix_k_permute(t, 2, rng=5)
    assert torch.equal(a, fix_k_permute(t, 2, rng=5))
    assert torch.equal(a, fix_k_permute(t, 2, rng=torch.Generator().manual_seed(5)))
    assert not torch.equal(a, fix_k_permute(t, 2, rng=6))
    assert torch.equal(manipulate(t, lab, "permute", k=2, seed=5), a)
    cf = manipulate(t, lab, "correct-fix", k=1, seed=9)
    assert torch.equal(cf, manipulate(t, lab, "correct-fix", k=1, seed=9))
    assert not torch.equal(cf, manipulate(t, lab, "correct-fix", k=1, seed=10))


# ------------------------------------------------------------------------- average


@pytest.mark.parametrize("k", [1, 2, 5, C - 1, C])
def test_average_keeps_sum_and_topk(k):
    t, _ = _data()
    out = fix_k_average(t, k)
    torch.testing.assert_close(out.sum(1), t.sum(1), rtol=0, atol=1e-4)
    top = _topk_classes(t, k)
    assert torch.equal(out.gather(1, top), t.gather(1, top))
    assert torch.equal(_topk_classes(out, k), top)
    bottom = torch.sort(t, dim=1, descending=True, stable=True).indices[:, k:]
    if C - k > 0:
        b = out.gather(1, bottom)
        assert torch.equal(b, b[:, :1].expand_as(b))  # all bottom values equal
        torch.testing.assert_close(b[:, 0], t.gather(1, bottom).mean(1))


@pytest.mark.parametrize("name", ["permute", "average"])
def test_k_equals_c_is_identity(name):
    t, lab = _data()
    assert torch.equal(manipulate(t, lab, name, k=C), t)
    assert torch.equal(manipulate(t, lab, name, k=C - 1), t)


# --------------------------------------------------------------------- correct-fix


@pytest.mark.parametrize("mode", ["permute", "average"])
@pytest.mark.parametrize("k", [1, 2, 3, C])
def test_correct_fix_argmax_is_label(mode, k):
    t, lab = _data(n=2000)
    wrong = t.argmax(1) != lab
    assert 0.5 < wrong.float().mean() < 1.0
    out = correct_fix(t, lab, k, fix_mode=mode, rng=2)
    assert torch.equal(out.argmax(1), lab)
    # No ties in random data: the multiset of the fixed row survives the swap.
    fixed = fix_k_permute(t, k, rng=2) if mode == "permute" else fix_k_average(t, k)
    assert torch.equal(_sorted_rows(out), _sorted_rows(fixed))
    # Rows the teacher got right are untouched fix-k rows; wrong rows differ in exactly 2 classes.
    assert torch.equal(out[~wrong], fixed[~wrong])
    assert torch.all((out[wrong] != fixed[wrong]).sum(1) == 2)


def test_correct_fix_label_inside_and_outside_topk():
    t = torch.tensor([[5.0, 4.0, 1.0, 0.0], [5.0, 4.0, 1.0, 0.0]])
    lab = torch.tensor([1, 3])  # row 0: label is 2nd (inside top-2); row 1: label outside
    out = correct_fix(t, lab, 2, fix_mode="average")
    assert torch.equal(out, torch.tensor([[4.0, 5.0, 0.5, 0.5], [0.5, 4.0, 0.5, 5.0]]))
    out = correct_fix(t, lab, 2, fix_mode="permute", rng=0)
    assert torch.equal(out.argmax(1), lab)
    assert torch.equal(out[0, :2], torch.tensor([4.0, 5.0]))
    assert out[1, 3] == 5.0 and out[1, 1] == 4.0


def test_correct_fix_with_ties_still_makes_label_unique_argmax():
    t = torch.tensor([[2.0, 2.0, 2.0, 2.0], [5.0, 5.0, 1.0, 0.0], [1.0, 5.0, 5.0, 0.0], [3.0, 3.0, 3.0, 9.0]])
    lab = torch.tensor([3, 1, 2, 0])
    for mode in ("permute", "average"):
        for k in (1, 2, 4):
            out = correct_fix(t, lab, k, fix_mode=mode, rng=0)
            assert torch.equal(out.argmax(1), lab), (mode, k, out)
            others = out.scatter(1, lab[:, None], float("-inf"))
            assert torch.all(others.max(1).values < out.gather(1, lab[:, None])[:, 0])


# -------------------------------------------------------------------------- hybrid


def test_hybrid_properties():
    at, lab = _data(seed=0)
    st, _ = _data(seed=1)
    out = hybrid(at, st)
    assert torch.equal(out.argmax(1), st.argmax(1))
    assert torch.equal(_sorted_rows(out), _sorted_rows(at))
    assert torch.equal(_topk_classes(out, C), _topk_classes(st, C))  # full ST ranking
    assert torch.equal(manipulate(at, lab, "hybrid", st_targets=st), out)


def test_hybrid_st_ties_rank_by_class_index():
    at = torch.tensor([[9.0, 1.0, 5.0]])
    st = torch.tensor([[0.0, 7.0, 7.0]])  # classes 1 and 2 tie: class 1 ranks first
    assert torch.equal(hybrid(at, st), torch.tensor([[1.0, 9.0, 5.0]]))


def test_tie_rule_lowest_class_index_first():
    # C=100 (CIFAR-100): wide enough that an unstable sort would reorder ties.
    c = 100
    st = torch.zeros(2, c)
    st[:, ::3] = 1.0  # classes 0, 3, 6, ... tie at the top
    at = torch.arange(c, 0, -1, dtype=torch.float32).repeat(2, 1)
    out = hybrid(at, st)
    top_classes = torch.arange(0, c, 3)
    rest = torch.tensor([i for i in range(c) if i % 3])
    assert torch.equal(out[:, top_classes], at[:, : len(top_classes)])
    assert torch.equal(out[:, rest], at[:, len(top_classes) :])
    # fix-k keeps the k lowest-index classes among tied values
    kept = fix_k_average(st, 5)
    assert torch.equal(kept[:, top_classes[:5]], torch.ones(2, 5))
    assert torch.all(kept[:, top_classes[5:]] < 1.0)


# ----------------------------------------------------- docstring example, none, purity


def test_docstring_example_rows():
    t = torch.tensor([[4.0, 1.0, 3.0, -1.0, 0.5, -2.0]])
    lab = torch.tensor([2])
    st = torch.tensor([[0.2, 2.5, 6.0, -0.5, 1.0, -1.0]])
    avg = torch.tensor([[4.0, -0.375, 3.0, -0.375, -0.375, -0.375]])
    torch.testing.assert_close(manipulate(t, lab, "average", k=2), avg)
    torch.testing.assert_close(
        manipulate(t, lab, "correct-fix", k=1, fix_mode="average"),
        torch.tensor([[0.3, 0.3, 4.0, 0.3, 0.3, 0.3]]),
    )
    hyb = torch.tensor([[0.5, 3.0, 4.0, -1.0, 1.0, -2.0]])
    assert torch.equal(manipulate(t, lab, "hybrid", st_targets=st), hyb)


@pytest.mark.parametrize("name", MANIPULATIONS)
def test_input_untouched_and_new_tensor(name):
    t, lab = _data()
    st, _ = _data(seed=1)
    t0, lab0, st0 = t.clone(), lab.clone(), st.clone()
    out = manipulate(t, lab, name, k=2, st_targets=st, seed=0)
    assert out.data_ptr() != t.data_ptr()
    assert out.shape == t.shape and out.dtype == t.dtype
    assert torch.equal(t, t0) and torch.equal(lab, lab0) and torch.equal(st, st0)
    if name == "none":
        assert torch.equal(out, t)


# -------------------------------------------------------------------------- report


def test_report_counts():
    orig = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [5.0, 0.0, 0.0]])
    lab = torch.tensor([0, 2, 2, 1])  # teacher wrong on rows 1 and 3
    r = manipulation_report(orig, correct_fix(orig, lab, 1, fix_mode="average"), lab)
    assert r["n_targets"] == 4
    assert r["n_teacher_errors"] == 2 and r["teacher_error_rate"] == 0.5
    assert r["n_argmax_changed"] == 2 and r["frac_argmax_changed"] == 0.5
    assert r["n_manipulated_errors"] == 0 and r["manipulated_error_rate"] == 0.0
    r = manipulation_report(orig, orig.clone(), lab)
    assert r["n_argmax_changed"] == 0 and r["manipulated_error_rate"] == 0.5


def test_report_permute_k1_never_changes_argmax_hybrid_does():
    t, lab = _data()
    st, _ = _data(seed=1)
    assert manipulation_report(t, fix_k_permute(t, 1), lab)["n_argmax_changed"] == 0
    r = manipulation_report(t, hybrid(t, st), lab)
    assert r["n_argmax_changed"] == int((t.argmax(1) != st.argmax(1)).sum()) > 0


# ----------------------------------------------------------------------- bad input


def _bad(match, *args, **kwargs):
    with pytest.raises(UserError, match=match):
        manipulate(*args, **kwargs)


def test_bad_manipulation_lists_valid_ones():
    t, lab = _data(n=5)
    with pytest.raises(UserError) as e:
        manipulate(t, lab, "shuffle", k=1)
    msg = str(e.value)
    assert "shuffle" in msg and all(m in msg for m in MANIPULATIONS) and "\n" not in msg


@pytest.mark.parametrize("k", [0, -1, C + 1, None, 1.0, True])
@pytest.mark.parametrize("name", ["permute", "average", "correct-fix"])
def test_bad_k(name, k):
    t, lab = _data(n=5)
    _bad(r"\bk\b", t, lab, name, k=k)


@pytest.mark.parametrize("k", [0, C + 1])
def test_bad_k_low_level(k):
    t, lab = _data(n=5)
    for fn in (
        lambda: fix_k_permute(t, k),
        lambda: fix_k_average(t, k),
        lambda: correct_fix(t, lab, k),
    ):
        with pytest.raises(UserError, match=r"1\.\.10"):
            fn()


def test_bad_inputs():
    t, lab = _data(n=5)
    _bad("st_targets", t, lab, "hybrid")
    _bad("shape", t, lab, "hybrid", st_targets=t[:, :3])
    _bad("fix_mode", t, lab, "correct-fix", k=1, fix_mode="median")
    _bad("labels", t, lab[:3], "none")
    _bad("labels", t, lab.float(), "none")
    _bad("labels", t, torch.full_like(lab, C), "none")
    _bad(r"\[N, C\]", t[0], lab, "none")
    _bad("floating", t.long(), lab, "none")
    _bad("torch.Tensor", t.numpy(), lab, "none")
    for bad in (float("nan"), float("inf")):
        t2 = t.clone()
        t2[2, 3] = bad
        _bad("non-finite", t2, lab, "permute", k=1)
        _bad("non-finite", t, lab, "hybrid", st_targets=t2)
    with pytest.raises(UserError, match="shape"):
        manipulation_report(t, t[:, :4], lab)
