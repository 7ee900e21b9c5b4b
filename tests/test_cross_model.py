"""Section 4.1's cross-model analyses: ranks (Fig. 3A/B), error classes (3C), average overlap
(3D/B.6), image grids (B.2/B.3), and the shared test-logit cache."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from analysis.error_classes import class_means, distribution, error_ranks, rank_table
from analysis.images import nearest_by_cosine, quadrants
from analysis.overlap import average_overlap, curve, positions, within_class_permutation
from analysis.ranks import class_ranks, confidence, disagreement, rank_matrix
from robustlogits.cli import app

ST, AT = "synthetic-cnn-tiny-st", "synthetic-cnn-tiny-at"


def ao_by_hand(l1: list[int], l2: list[int], k: int) -> float:
    return sum(len(set(l1[:d]) & set(l2[:d])) / d for d in range(1, k + 1)) / k


# ----------------------------------------------------------------------------- pure functions


def test_average_overlap_equals_hand_computation():
    # logits whose rank orders are [2, 0, 3, 1] and [0, 2, 1, 3]
    a = np.array([[3.0, 0.5, 9.0, 1.0]])
    b = np.array([[8.0, 2.0, 5.0, -1.0]])
    got = average_overlap(positions(a), positions(b))[0]
    # d=1: {2}&{0}=0; d=2: {2,0}&{0,2}=1; d=3: 2/3; d=4: 1  -> AO@k = running means
    np.testing.assert_allclose(got, [0.0, 0.5, (0 + 1 + 2 / 3) / 3, (0 + 1 + 2 / 3 + 1) / 4], atol=1e-12)
    rng = np.random.default_rng(0)
    za, zb = rng.normal(size=(50, 7)), rng.normal(size=(50, 7))
    pa, pb = positions(za), positions(zb)
    ao = average_overlap(pa, pb)
    for n in range(50):
        l1, l2 = list(np.argsort(-za[n], kind="stable")), list(np.argsort(-zb[n], kind="stable"))
        assert [ao_by_hand(l1, l2, k) for k in range(1, 8)] == pytest.approx(ao[n].tolist(), abs=1e-12)


def test_average_overlap_of_a_ranking_with_itself_is_one_and_ties_go_to_the_lower_class():
    z = np.random.default_rng(1).normal(size=(30, 10))
    np.testing.assert_array_equal(average_overlap(positions(z), positions(z)), 1.0)
    assert positions(np.array([[1.0, 1.0, 2.0]])).tolist() == [[1, 2, 0]]


def test_permuted_copy_behaves_as_the_control():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 25)
    z = rng.normal(size=(100, 4)) + 3 * np.eye(4)[labels]
    perm = within_class_permutation(labels, seed=5)
    assert (labels[perm] == labels).all() and sorted(perm) == list(range(100)) and (perm != np.arange(100)).any()
    copy = z[perm]  # a "model" whose outputs are the first one's, shuffled within each class
    np.testing.assert_allclose(curve(z, copy), curve(z, z, perm), atol=0)
    assert curve(z, z)[0] == 1.0 and curve(z, copy)[0] < 1.0
    # the control removes per-image agreement but keeps the per-class structure: top-1 agrees on the class
    assert curve(z, copy)[0] > 0.5


def test_class_ranks_are_deterministic_with_ties():
    values = np.array([0.5, 0.5, 0.9, 0.1, 0.3, 0.5])
    labels = np.array([0, 0, 0, 1, 1, 0])
    expected = [2, 3, 1, 2, 1, 4]  # ties keep test-set order
    for _ in range(3):
        assert class_ranks(values, labels).tolist() == expected
    # ties follow position: reversing the input reverses the order among tied examples only
    assert class_ranks(values[::-1], labels[::-1])[::-1].tolist() == [4, 3, 1, 2, 1, 2]


def test_rank_disagreement_self_is_zero_and_reversal_is_counted():
    labels = np.repeat([0, 1], 10)
    values = np.r_[np.linspace(1, 0, 10), np.linspace(0, 1, 10)]
    ranks = class_ranks(values, labels)
    assert disagreement(ranks, ranks, labels, 2)[0] == 0.0
    reversed_ranks = class_ranks(-values, labels)
    # ranks 1..10 against 10..1: |diff| = 9,7,5,3,1,1,3,5,7,9 -> > 5 for 4 of 10 examples per class
    frac, per_class = disagreement(ranks, reversed_ranks, labels, 2)
    assert frac == pytest.approx(0.4) and per_class.tolist() == [0.4, 0.4]
    z = np.random.default_rng(0).normal(size=(20, 2))
    matrix, _, _ = rank_matrix([z, z, -z], labels, 2)
    assert matrix[0, 1] == 0 and matrix[0, 2] > 0 and (matrix == matrix.T).all()


def test_confidence_softmax_is_stable_for_large_logits():
    z = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    assert confidence(z, np.array([0, 0])).tolist() == [1.0, 0.0]
    assert confidence(z, np.array([0, 0]), score="logit").tolist() == [1000.0, 0.0]
    assert confidence(z, np.array([0, 0]), target="top").tolist() == [1.0, 1.0]


def test_error_ranks_on_a_crafted_example():
    # class 0's correct examples average to [5, 1, 3]: class 2 ranks 2nd, class 1 3rd
    # class 1's correct examples average to [2, 6, 0]: class 0 2nd, class 2 3rd; class 2 has none correct
    logits = np.array(
        [
            [6, 1, 2],
            [4, 1, 4 - 1e-3],
            [2, 6, 0],  # correct (0, 0, 1)
            [1, 0, 2],
            [0, 3, 1],  # label 0: predicted 2 (rank 2), predicted 1 (rank 3)
            [3, 1, 0],  # label 1: predicted 0 (rank 2)
            [5, 0, 1],
        ],
        dtype=float,
    )  # label 2, predicted 0: class 2 has no mean
    labels = np.array([0, 0, 1, 0, 0, 1, 2])
    means, counts = class_means(logits, labels, 3)
    assert counts.tolist() == [2, 1, 0] and np.isnan(means[2]).all()
    assert rank_table(means[:2]).tolist() == [[1, 3, 2], [2, 1, 3]]
    ranks, unranked = error_ranks(means, labels, logits.argmax(1))
    assert ranks.tolist() == [2, 3, 2] and unranked == 1
    assert distribution(ranks, 3) == pytest.approx([0, 2 / 3, 1 / 3])


def test_nearest_by_cosine_and_quadrants():
    z = np.array([[1.0, 0], [0.9, 0.1], [0, 1], [2.0, 0.0], [-1, 0]])
    idx, sim = nearest_by_cosine(z, np.array([0, 2]), 2)
    assert idx[0].tolist() == [3, 1] and sim[0, 0] == pytest.approx(1.0)
    assert idx[1].tolist() == [1, 0]
    a = np.array([0.9, 0.8, 0.1, 0.2, 0.5])
    b = np.array([0.9, 0.1, 0.8, 0.2, 0.5])
    q = quadrants(a, b, 1)
    assert q["A high, B high"]["members"].tolist() == [0]
    assert q["A high, B low"]["members"].tolist() == [1] and q["A low, B high"]["members"].tolist() == [2]
    assert sum(len(v["members"]) for v in q.values()) == 5


# ----------------------------------------------------------------------------- jobs, CLI, MLflow


def _run_of(output: str) -> str:
    return output.strip().split("run ")[-1]


def _no_running_runs():
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return not client.search_runs(ids, "attributes.status = 'RUNNING'")


def test_ranks_and_overlap_of_st_and_at_teachers(with_teachers, tmp_path):
    runner = CliRunner()
    ranks = runner.invoke(
        app, ["analyze", "ranks", "--models", ST, AT, "--class", "class6", "--out", str(tmp_path / "r")]
    )
    assert ranks.exit_code == 0, ranks.output
    summary = json.loads((tmp_path / "r" / "ranks.json").read_text())
    assert summary["groups"] == {"ST": [f"{ST} v2"], "AT": [f"{AT} v2"]}
    assert set(summary["group_stats"]) == {"ST-AT"} and summary["group_stats"]["ST-AT"]["n_pairs"] == 1
    assert 0 <= summary["matrix"][0][1] <= 1 and summary["matrix"][0][0] == 0
    assert summary["focus"]["class"] == "class6" and len(summary["focus"]["rank_x"]) == 16
    assert {s["source"] for s in summary["logit_sources"].values()} == {"checkpoint"}
    run = MlflowClient().get_run(_run_of(ranks.output))
    assert run.info.status == "FINISHED" and run.data.tags["robustlogits.job"] == "analyze-ranks"
    assert "disagreement.ST-AT.mean" in run.data.metrics
    assert len(run.inputs.model_inputs) == 2
    logged = {f.path for f in MlflowClient().list_artifacts(run.info.run_id, "ranks")}
    assert {"ranks/figure3a_rank_scatter.png", "ranks/figure3b_rank_disagreement.png", "ranks/ranks.json"} <= logged

    overlap = runner.invoke(app, ["analyze", "overlap", "--models", ST, AT, "--out", str(tmp_path / "o")])
    assert overlap.exit_code == 0, overlap.output
    summary = json.loads((tmp_path / "o" / "overlap.json").read_text())
    curves = summary["group_curves"]
    assert summary["k"] == list(range(1, 11))
    ao = curves["ST-AT"]["same_example"]["mean"]
    assert 10 * ao[9] - 9 * ao[8] == pytest.approx(1.0)  # O(C) = 1: at depth C both lists hold every class
    assert all(0 <= v <= 1 for v in ao)
    assert set(curves) == {"ST-AT", "ST self", "AT self"}
    assert MlflowClient().get_run(_run_of(overlap.output)).info.status == "FINISHED"


def test_a_model_against_itself_agrees_perfectly(with_teachers, tmp_path):
    from analysis.overlap import run as overlap
    from analysis.ranks import run as ranks

    r = ranks([AT, AT], out_dir=tmp_path / "r", track=False)
    assert r["matrix"] == [[0.0, 0.0], [0.0, 0.0]] and r["run_id"] is None
    assert r["group_stats"]["AT-AT"] == {"n_pairs": 1, "mean": 0.0, "std": 0.0, "pairs": [[f"{AT} v2", f"{AT} v2 #2"]]}
    o = overlap([AT, AT], out_dir=tmp_path / "o", track=False)
    assert o["group_curves"]["AT-AT"]["same_example"]["mean"] == [1.0] * 10
    assert min(o["group_curves"]["AT-AT"]["permuted_within_class"]["mean"][:3]) < 1.0


def test_logits_are_cached_per_version_and_data(with_teachers, tmp_path):
    from robustlogits.jobs.test_logits import open_models

    version = MlflowClient().get_model_version(AT, "2")
    uri = f"runs:/{version.run_id}/epoch-0002"
    first = open_models([uri]).logits()[0]
    assert first.source == "computed" and first.logits.dtype == np.float32
    again = open_models([uri]).logits()[0]
    assert again.source == "cache" and again.run_id == first.run_id
    np.testing.assert_array_equal(again.logits, first.logits)
    # the checkpoint's own stored logits are the same numbers (same model, same data, fp32)
    stored = open_models([f"models:/{AT}/2"]).logits()[0]
    assert stored.source == "checkpoint"
    np.testing.assert_allclose(stored.logits, first.logits, atol=1e-5)
    run = MlflowClient().get_run(first.run_id)
    assert run.data.tags["robustlogits.job"] == "test-logits" and run.info.status == "FINISHED"


def test_errors_with_natural_and_adversarial_errors(with_teachers, tmp_path):
    from analysis.error_classes import run as errors
    from robustlogits.config import AttackConfig
    from robustlogits.jobs.attack import run_attack

    attack_id, _ = run_attack(AttackConfig(model=f"models:/{AT}/2", n_examples=60, n_iter=5), progress=False)
    summary = errors([ST, AT], out_dir=tmp_path / "e")
    at, st = summary["models"][f"{AT} v2"], summary["models"][f"{ST} v2"]
    assert at["attack_run"] == attack_id and at["adversarial"] is not None
    assert at["natural"][0] == 0.0 and sum(at["natural"]) == pytest.approx(1.0)  # rank 1 is the true class
    assert st["natural"][0] == 0.0
    assert at["n_adversarial_errors"] >= 0 and (tmp_path / "e" / "figure3c_error_ranks.png").is_file()
    assert MlflowClient().get_run(summary["run_id"]).info.status == "FINISHED"


def test_images_writes_quadrants_and_neighbours(with_teachers, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "analyze",
            "images",
            "--models",
            ST,
            AT,
            "--per-quadrant",
            "4",
            "--n-random-seeds",
            "50",
            "--seed-classes",
            "class1,class2",
            "--out",
            str(tmp_path / "i"),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "i" / "images.json").read_text())
    assert summary["quadrants"]["class"] == "class0"
    assert sum(q["n"] for q in summary["quadrants"]["quadrants"].values()) == 16
    for entry in summary["neighbours"]["models"].values():
        assert np.asarray(entry["neighbour_index"]).shape == (2, 5)
        assert all(s not in row for s, row in zip(entry["seed_index"], entry["neighbour_index"]))
        assert 0 <= entry["same_class_fraction"] <= 1
    assert {p.name for p in (tmp_path / "i").iterdir()} >= {
        "figure_b2_confidence_quadrants.png",
        "figure_b3_logit_neighbours.png",
    }


def test_bad_input_is_one_line_exit_2_and_nothing_running(with_teachers, tmp_path):
    runner = CliRunner()
    before = len(
        MlflowClient().search_runs(
            [e.experiment_id for e in MlflowClient().search_experiments()], "tags.`robustlogits.job` LIKE 'analyze-%'"
        )
    )
    one = runner.invoke(app, ["analyze", "ranks", "--models", AT, "--out", str(tmp_path / "x")])
    assert one.exit_code == 2 and "needs at least 2 models" in one.output
    no_class = runner.invoke(
        app, ["analyze", "ranks", "--models", ST, AT, "--class", "frog", "--out", str(tmp_path / "x")]
    )
    assert no_class.exit_code == 2 and "no class 'frog'" in no_class.output
    overlap_one = runner.invoke(app, ["analyze", "overlap", "--group", f"AT={AT}", "--out", str(tmp_path / "x")])
    assert overlap_one.exit_code == 2 and "at least 2 models" in overlap_one.output
    bad_group = runner.invoke(app, ["analyze", "overlap", "--group", "AT", "--out", str(tmp_path / "x")])
    assert bad_group.exit_code == 2 and "NAME=MODEL" in bad_group.output

    from robustlogits.config import AttackConfig
    from robustlogits.jobs.attack import run_attack

    st_attack, _ = run_attack(AttackConfig(model=f"models:/{ST}/2", n_examples=20, n_iter=2), progress=False)
    wrong = runner.invoke(
        app, ["analyze", "errors", "--models", AT, "--attack-runs", st_attack, "--out", str(tmp_path / "x")]
    )
    assert wrong.exit_code == 2 and f"attack run {st_attack} attacked {ST} v2" in wrong.output
    assert not (tmp_path / "x").exists()
    after = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], "tags.`robustlogits.job` LIKE 'analyze-%'"
    )
    assert len(after) == before and _no_running_runs()


def test_models_of_different_class_counts_are_refused(with_teachers, tmp_path):
    from robustlogits import tracking
    from robustlogits.core.models import build_model

    with mlflow.start_run() as run:
        mlflow.log_params({"data.dataset": "synthetic", "data.synthetic_classes": 5})
        tracking.log_torch_model(build_model("cnn-tiny", 5, "synthetic"), "five")
    result = CliRunner().invoke(
        app, ["analyze", "overlap", "--models", AT, f"runs:/{run.info.run_id}/five", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "different class counts" in result.output
    assert _no_running_runs()


def test_mlproject_entry_point_runs_the_new_modes(with_teachers, tmp_path):
    from robustlogits.cli import mlproject

    with pytest.raises(SystemExit) as done:  # as `mlflow run -e analyze -P mode=overlap ...` calls it
        mlproject.run_entry_point(
            "analyze",
            [
                "--mode",
                "overlap",
                "--models",
                f"{ST},{AT}",
                "--group",
                f"ST={ST};AT={AT}",
                "--out",
                str(tmp_path / "o"),
                "--bins",
                "default",
            ],
        )
    assert done.value.code == 0
    summary = json.loads((tmp_path / "o" / "overlap.json").read_text())
    assert summary["groups"] == {"ST": [f"{ST} v2"], "AT": [f"{AT} v2"]}
    with pytest.raises(SystemExit) as exit_info:
        mlproject.run_entry_point("analyze", ["--mode", "nope"])
    assert exit_info.value.code == 2
