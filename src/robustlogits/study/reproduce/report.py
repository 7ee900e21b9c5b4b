"""The study's report: `report/report.md` and `report/index.html`, written to `--out` and logged
on the study's parent run.

Every number is read back from the run that produced it (found by its step key) and links to
it; Tables 1 and 2 sit beside the paper's values; figures are the runs' own artifacts plus the
across-run plots only the study can draw (Figure 4B, A.6/A.7); every claim gets its verdict.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from robustlogits import tracking  # noqa: E402
from robustlogits.study.reproduce.claims import judge_all  # noqa: E402
from robustlogits.study.reproduce.collect import collect  # noqa: E402
from robustlogits.study.reproduce.paper import TABLE1, TABLE2, TABLE2_LABELS, TEACHER_TRAIN_ERROR  # noqa: E402
from robustlogits.study.reproduce.provenance import html_lines, markdown_lines, provenance, worker_times  # noqa: E402

UI_URL = os.environ.get("ROBUSTLOGITS_UI_URL", "http://127.0.0.1:5000")


def run_link(run_id: str) -> str:
    exp = tracking.run_record(run_id).experiment_id
    return f"{UI_URL}/#/experiments/{exp}/runs/{run_id}"


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over seeds (std None for a single seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def pct(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


# --- figures --------------------------------------------------------------------------------------


def gather_figures(results: dict, folder: Path) -> list[dict]:
    """The runs' own figures (copied) and the study's across-run plots (drawn here)."""
    ds, runs = results["dataset"], results["runs"]
    figures = []

    def copy(figure_id: str, title: str, run_id: str | None, artifact: str, who: str = "") -> None:
        if not run_id:
            return
        try:
            source = tracking.download_artifact(run_id, artifact)
        except Exception:  # noqa: BLE001
            return
        slug = re.sub(r"[^a-z0-9]+", "-", f"{ds} {figure_id} {who}".lower()).strip("-")
        target = folder / f"{slug}-{Path(artifact).name}"
        shutil.copyfile(source, target)
        figures.append({"id": figure_id, "title": title, "file": target.name, "run": run_id})

    fig1 = "Figure 1" if ds != "cifar100" else "Figure B.4"
    for kind, who in (("st", "ST"), ("at", "AT")):
        train = runs.get(f"train/{ds}/{kind}/s0")
        copy(
            fig1,
            f"{fig1}: max-logit distribution per epoch, {who} (seed 0)",
            train,
            "figures/max_logit_evolution.png",
            who,
        )
        copy(
            "Figure B.1",
            f"Figure B.1: logit-gap distribution per epoch, {who} (seed 0)",
            train,
            "figures/gap_evolution.png",
            who,
        )
    fig2 = "Figure 2" if ds != "cifar100" else "Figure B.5"
    copy(
        fig2,
        f"{fig2}: logit gaps (A) and adversarial accuracy per gap bin (B), every seed",
        runs.get(f"analyze/{ds}/gap"),
        "gap/figure2_gap_robustness.png",
    )
    for analysis, artifact, figure_id, title in (
        ("ranks", "figure3a_rank_scatter.png", "Figure 3A", "Figure 3A: class-wise confidence ranks, ST against AT"),
        (
            "ranks",
            "figure3b_rank_disagreement.png",
            "Figure 3B",
            "Figure 3B: share of images ranked far apart, every pair of teachers",
        ),
        (
            "errors",
            "figure3c_error_ranks.png",
            "Figure 3C",
            "Figure 3C: rank of the predicted class of errors in the true class's mean logit vector",
        ),
        (
            "overlap",
            "figure3d_average_overlap.png",
            "Figure 3D" if ds != "cifar100" else "Figure B.6",
            "Average overlap AO@k (solid: same image; dashed: permuted within class)",
        ),
        ("images", "figure_b2_confidence_quadrants.png", "Figure B.2", "Figure B.2: images by ST and AT confidence"),
        ("images", "figure_b3_logit_neighbours.png", "Figure B.3", "Figure B.3: nearest images in logit space"),
    ):
        copy(figure_id, title, runs.get(f"analyze/{ds}/{analysis}"), f"{analysis}/{artifact}")
    copy(
        "Figure 5",
        "Figure 5: manifold capacity, radius, dimension and centre correlation per stage",
        runs.get(f"analyze/{ds}/manifold/s0"),
        "manifold/figure5_manifold.png",
    )
    copy(
        "Figure A.8",
        "Figure A.8: mean-field against simulated capacity",
        runs.get(f"analyze/{ds}/manifold/s0"),
        "manifold/figure_a8_mean_field_vs_simulated.png",
    )
    copy(
        "Appendix C.2.5",
        "Appendix C.2.5: gap shrinkage of correct predictions under a small attack, against the clean gap",
        runs.get(f"analyze/{ds}/gap-response"),
        "gap_response/gap_response.png",
    )
    for name, title in (
        ("fig_empirical_admissible.png", "Appendix C: the teachers' logits on the admissible axes"),
        ("fig_c1_admissible_beta.png", "Figure C.1: admissible max logits"),
    ):
        copy("Appendix C", title, runs.get(f"analyze/{ds}/theory"), f"theory/{name}")
    if results["students"]:
        path = folder / f"{ds}-figure4b.png"
        runs_used = _figure_4b(results["students"], path)
        if runs_used:
            figures.append(
                {
                    "id": "Figure 4B",
                    "title": "Figure 4B: student adversarial accuracy against k (fix-k)",
                    "file": path.name,
                    "run": runs_used[0],
                    "runs": runs_used,
                }
            )
    if results["sweeps"]:
        path = folder / f"{ds}-figure-a6-a7.png"
        runs_used = _figure_sweeps(results["sweeps"], path)
        figures.append(
            {
                "id": "Figures A.6, A.7",
                "title": "Figures A.6 and A.7: students against the teacher's epoch, "
                "L1 (logits) and KL (softmax) distillation",
                "file": path.name,
                "run": runs_used[0],
                "runs": runs_used,
            }
        )
    return figures


def _figure_4b(students: dict, path: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 4))
    used = []
    for mode, marker in (("permute", "o"), ("average", "s")):
        ks = sorted(int(label.split("-k")[1]) for label in students if label.startswith(f"{mode}-k"))
        if not ks:
            continue
        stats = [mean_std([r["adversarial"] for r in students[f"{mode}-k{k}"]]) for k in ks]
        ax.errorbar(
            ks,
            [100 * m for m, _ in stats],
            yerr=[100 * (s or 0) for _, s in stats],
            marker=marker,
            capsize=3,
            label=f"fix-k ({mode})",
        )
        used += [r["run"] for k in ks for r in students[f"{mode}-k{k}"]]
    if not used:
        plt.close(fig)
        return []
    normal, _ = mean_std([r["adversarial"] for r in students.get("normal", [])])
    if normal is not None:
        ax.axhline(100 * normal, color="k", ls="--", label="normal distillation")
        used += [r["run"] for r in students["normal"]]
    ax.set_xlabel("k (top values kept)")
    ax.set_ylabel("adversarial accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return used


def _figure_sweeps(sweeps: dict, path: Path) -> list[str]:
    """Mean over seeds against the teacher's checkpoint epoch, error bars the spread over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for loss in sorted({loss for _, _, loss in sweeps}):
        epochs = sorted({e for _, e, lo in sweeps if lo == loss})
        for ax, metric in zip(axes, ("adversarial", "natural")):
            stats = [
                mean_std([r[metric] for (_, e, lo), r in sweeps.items() if e == ep and lo == loss]) for ep in epochs
            ]
            ax.errorbar(
                epochs,
                [100 * (m or 0) for m, _ in stats],
                yerr=[100 * (sd or 0) for _, sd in stats],
                marker="o",
                capsize=3,
                label=loss.upper(),
            )
    for ax, metric in zip(axes, ("adversarial", "natural")):
        ax.set_xlabel("teacher checkpoint epoch")
        ax.set_ylabel(f"student {metric} accuracy (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [r["run"] for r in sweeps.values()]


# --- the report -----------------------------------------------------------------------------------


def build_sections(plan, sc, seeds: int, folder: Path) -> dict:
    """The report's content as data; markdown and HTML are two renderings of it."""
    datasets = []
    studies = {dataset: collect(plan, dataset) for dataset in plan.datasets}
    judged = judge_all(studies, sc.name)
    for dataset, results in studies.items():
        table1 = []
        for kind, who in (("st", "ST"), ("at", "AT")):
            rows = results["teachers"][kind]
            nat, adv = mean_std([r.get("natural") for r in rows]), mean_std([r.get("adversarial") for r in rows])
            paper = TABLE1.get((dataset, kind))
            unread = "illegible in our copy" if paper else "n/a (paper: CIFAR only)"
            paper = paper or (None, None)
            table1.append(
                {
                    "model": who,
                    "natural": pct(*nat),
                    "adversarial": pct(*adv),
                    "n": len(rows),
                    "paper_natural": paper[0] or unread,
                    "paper_adversarial": paper[1] or unread,
                    "runs": [r["run"] for r in rows if r.get("run")],
                    "raw": {"natural": nat, "adversarial": adv},
                }
            )
        table2 = []
        for label, name in TABLE2_LABELS.items():
            rows = results["students"].get(label, [])
            if not rows:
                continue
            nat, adv = mean_std([r["natural"] for r in rows]), mean_std([r["adversarial"] for r in rows])
            table2.append(
                {
                    "student": name,
                    "natural": pct(*nat),
                    "adversarial": pct(*adv),
                    "n": len(rows),
                    "paper_natural": TABLE2[label][0],
                    "paper_adversarial": TABLE2[label][1],
                    "runs": [r["run"] for r in rows],
                    "raw": {"natural": nat, "adversarial": adv},
                }
            )
        errors = [
            r["teacher_error"] for r in results["students"].get("normal", []) if r.get("teacher_error") is not None
        ]
        datasets.append(
            {
                "dataset": dataset,
                "table1": table1,
                "table2": table2,
                "teacher_error": pct(*mean_std(errors)) if errors else None,
                "figures": gather_figures(results, folder),
            }
        )
    return {
        "scale": sc.name,
        "seeds": seeds,
        "claims": judged["claims"],
        "counts": judged["counts"],
        "regimes": judged["regimes"],
        "differences": judged["differences"],
        "datasets": datasets,
        "skipped": plan.skipped_datasets,
        "study_key": plan.study_key,
        "provenance": provenance(
            plan.steps,
            {n: r for res in studies.values() for n, r in res["runs"].items()},
            worker_times(plan.storage),
        ),
    }


def write_report(plan, sc, seeds: int, parent_run_id: str, out: Path) -> tuple[Path, list[str]]:
    """Write report/ under `out` (whole: built in a temporary folder, then moved) and log it."""
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".report-partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "figures").mkdir(parents=True)
    sections = build_sections(plan, sc, seeds, staging / "figures")
    sections["parent_run"] = parent_run_id
    links = {}
    for ds in [*sections["datasets"], {"table1": [], "table2": [], "figures": [], "claims": sections["claims"]}]:
        for item in [*ds["table1"], *ds["table2"], *ds.get("claims", []), *ds["figures"]]:
            for run_id in item.get("runs", []) + ([item["run"]] if item.get("run") else []):
                links.setdefault(run_id, run_link(run_id))
    (staging / "report.md").write_text(render_markdown(sections, links))
    (staging / "index.html").write_text(render_html(sections, links))
    (staging / "report.json").write_text(json.dumps(sections, indent=1, default=str))
    target = out / "report"
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    tracking.log_folder(target, "report", run_id=parent_run_id)
    verdicts = [c["verdict"] for c in sections["claims"]]
    tracking.log_results(
        {f"claims_{verdict.replace(' ', '_')}": count for verdict, count in sections["counts"].items()},
        run_id=parent_run_id,
    )
    return target, verdicts


def _run_refs(runs: list[str], links: dict) -> str:
    return ", ".join(f"[{r[:8]}]({links[r]})" for r in dict.fromkeys(runs))


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def part_text(part: dict) -> str:
    """'label: value [lo, hi] (se) vs threshold → verdict'."""
    se = f", se {_g(part['se'])}" if part.get("se") else ""
    return (
        f"{part['label']}: {_g(part['value'])} [{_g(part['lo'])}, {_g(part['hi'])}]{se}; "
        f"needs {part['threshold']} → {part['verdict']}"
    )


def summary_line(counts: dict) -> str:
    total = sum(counts.values())
    return f"{total} claims: " + ", ".join(f"{n} {v}" for v, n in counts.items())


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell ("|skew|" would split it)."""
    return text.replace("|", "\\|").replace("\n", " ")


def claims_markdown(sections: dict, links: dict) -> list[str]:
    lines = [
        "## Claims",
        "",
        f"**{summary_line(sections['counts'])}.** Each claim quotes the paper; its threshold is derived from "
        "the quoted words (see docs/claims.md); intervals are 95% (test-image sampling and seed spread). "
        "`held`: the whole interval meets the threshold; `not held`: none of it; `inconclusive`: it straddles; "
        "`out of regime`: a precondition below is unmet (numbers still shown).",
        "",
        "| regime | needs | this study | met |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| `{name}` | {r['what']} | {r['measured']} | {'yes' if r['met'] else 'no' if r['met'] is False else '–'} |"
        for name, r in sections["regimes"].items()
    ]
    if sections.get("differences"):
        lines += [
            "",
            "Where this study's setup departs from the paper's (appendix A.2); each claim's row names the "
            "departures its numbers depend on (`differs:`), so a verdict is read as one about this setup:",
            "",
            "| aspect | this study | the paper |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {a} | {d['study']} | {d['paper']} |" for a, d in sections["differences"].items()]
    lines += [
        "",
        "| id | section | the paper's words | measured: value [95% interval] | threshold (from the words) | verdict | runs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in sections["claims"]:
        measured = "<br>".join(_cell(part_text(p)) for p in c["parts"]) or _cell(c["measured"])
        extra = [x for x in (c.get("note"), c.get("paper_values") and f"paper: {c['paper_values']}") if x]
        if c.get("regimes_unmet"):
            extra.append("unmet: " + ", ".join(c["regimes_unmet"]))
        if c.get("differs"):
            extra.append("differs: " + ", ".join(c["differs"]))
        lines.append(
            f"| `{c['id']}` | {c['section']}, {c['where']} ({c['dataset']}) | {_cell(c['quote'])} | {measured}"
            f"{'<br>' + _cell('; '.join(extra)) if extra else ''} | {_cell(c['threshold'])} | **{c['verdict']}** | "
            f"{_run_refs(c['runs'], links)} |"
        )
    return lines + [""]


def render_markdown(sections: dict, links: dict) -> str:
    lines = [
        f"# Reproduction report: scale `{sections['scale']}`, {sections['seeds']} seed(s)",
        "",
        f"Study run: `{sections['parent_run']}` (key `{sections['study_key']}`). Accuracies in percent, "
        "mean ± sample standard deviation over seeds; every number links to the run that produced it.",
        "",
    ]
    for name, why in sections["skipped"].items():
        lines += [f"*{name} skipped: {why}.*", ""]
    lines += claims_markdown(sections, links)
    for ds in sections["datasets"]:
        lines += [
            f"## {ds['dataset']}",
            "",
            "### Table 1: teachers",
            "",
            "| model | natural (ours) | adversarial (ours) | natural (paper) | adversarial (paper) | seeds | runs |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['model']} | {r['natural']} | {r['adversarial']} | {r['paper_natural']} | "
            f"{r['paper_adversarial']} | {r['n']} | {_run_refs(r['runs'], links)} |"
            for r in ds["table1"]
        ]
        if ds["table2"]:
            lines += [
                "",
                "### Table 2: students",
                "",
                "| student | natural (ours) | adversarial (ours) | natural (paper) | adversarial (paper) | seeds | runs |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            lines += [
                f"| {r['student']} | {r['natural']} | {r['adversarial']} | {r['paper_natural']} | "
                f"{r['paper_adversarial']} | {r['n']} | {_run_refs(r['runs'], links)} |"
                for r in ds["table2"]
            ]
            if ds["teacher_error"]:
                lines += [
                    "",
                    f"AT teacher's training-set error: {ds['teacher_error']}% (paper: {TEACHER_TRAIN_ERROR}%).",
                ]
        lines += ["", "### Figures", ""]
        for f in ds["figures"]:
            lines += [f"**{f['title']}** ([run]({links[f['run']]}))", "", f"![{f['title']}](figures/{f['file']})", ""]
    lines += markdown_lines(sections["provenance"])
    return "\n".join(lines) + "\n"


HTML_HEAD = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}}
th{{background:#f3f3f3}}.held{{color:#176f2c;font-weight:bold}}.not-held{{color:#a31515;font-weight:bold}}
.not-measured{{color:#777}}.inconclusive{{color:#8a6d00;font-weight:bold}}.out-of-regime{{color:#555;font-style:italic}}figure{{margin:1.5em 0}}img{{max-width:100%}}.broken{{outline:3px solid #a31515}}
</style></head><body>"""
# Marks images that failed to load, so a broken report is visible at a glance (and to the tests).
HTML_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) { ok++; } else { im.classList.add('broken'); } });
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
</script>"""


def render_html(sections: dict, links: dict) -> str:
    e = html.escape

    def refs(runs):
        return ", ".join(f'<a href="{e(links[r])}" data-run="{r}">{r[:8]}</a>' for r in dict.fromkeys(runs))

    def cell(value, runs):
        return f'<td data-runs="{" ".join(runs)}">{e(value)}</td>'

    out = [
        HTML_HEAD.format(title=e(f"Reproduction report: {sections['scale']}")),
        f"<h1>Reproduction report: scale <code>{e(sections['scale'])}</code>, {sections['seeds']} seed(s)</h1>",
        f"<p>Study run <code>{e(sections['parent_run'])}</code> (key <code>{e(sections['study_key'])}</code>). "
        "Accuracies in percent, mean ± sample standard deviation over seeds; every number links to its runs.</p>",
    ]
    for name, why in sections["skipped"].items():
        out.append(f"<p><em>{e(name)} skipped: {e(why)}.</em></p>")
    out.append(
        f'<h2 id="claims">Claims</h2><p id="claim-counts"><strong>{e(summary_line(sections["counts"]))}</strong>. '
        "Thresholds are derived from the quoted words; intervals are 95%.</p>"
    )
    out.append('<table id="regimes"><tr><th>regime</th><th>needs</th><th>this study</th><th>met</th></tr>')
    for name, r in sections["regimes"].items():
        met = "yes" if r["met"] else "no" if r["met"] is False else "–"
        out.append(f"<tr><td>{e(name)}</td><td>{e(r['what'])}</td><td>{e(r['measured'])}</td><td>{met}</td></tr>")
    if sections.get("differences"):
        out.append(
            "</table><p>Where this study's setup departs from the paper's (A.2); each claim names the departures "
            'its numbers depend on.</p><table id="differences"><tr><th>aspect</th><th>this study</th>'
            "<th>the paper</th></tr>"
        )
        for aspect, d in sections["differences"].items():
            out.append(f"<tr><td>{e(aspect)}</td><td>{e(d['study'])}</td><td>{e(d['paper'])}</td></tr>")
    out.append(
        '</table><table id="claims"><tr><th>id</th><th>section</th><th>the paper\'s words</th>'
        "<th>measured: value [95% interval]</th><th>threshold</th><th>verdict</th><th>runs</th></tr>"
    )
    for c in sections["claims"]:
        css = c["verdict"].replace(" ", "-")
        measured = "<br>".join(e(part_text(p)) for p in c["parts"]) or e(c["measured"])
        extra = [x for x in (c.get("note"), c.get("paper_values") and f"paper: {c['paper_values']}") if x]
        if c.get("differs"):
            extra.append("differs: " + ", ".join(c["differs"]))
        out.append(
            f'<tr data-claim="{e(c["id"])}"><td>{e(c["id"])}</td><td>{e(c["section"])}, {e(c["where"])} '
            f"({e(str(c['dataset']))})</td><td>{e(c['quote'])}</td><td>{measured}"
            f"{'<br><small>' + e('; '.join(extra)) + '</small>' if extra else ''}</td><td>{e(c['threshold'])}</td>"
            f'<td class="{css}">{e(c["verdict"])}</td><td>{refs(c["runs"])}</td></tr>'
        )
    out.append("</table>")
    for ds in sections["datasets"]:
        out.append(f'<h2 id="{e(ds["dataset"])}">{e(ds["dataset"])}</h2><h3>Table 1: teachers</h3>')
        out.append(
            '<table id="table1"><tr><th>model</th><th>natural (ours)</th><th>adversarial (ours)</th>'
            "<th>natural (paper)</th><th>adversarial (paper)</th><th>seeds</th><th>runs</th></tr>"
        )
        for r in ds["table1"]:
            out.append(
                f"<tr><td>{e(r['model'])}</td>{cell(r['natural'], r['runs'])}{cell(r['adversarial'], r['runs'])}"
                f"<td>{e(r['paper_natural'])}</td><td>{e(r['paper_adversarial'])}</td><td>{r['n']}</td>"
                f"<td>{refs(r['runs'])}</td></tr>"
            )
        out.append("</table>")
        if ds["table2"]:
            out.append(
                '<h3>Table 2: students</h3><table id="table2"><tr><th>student</th><th>natural (ours)</th>'
                "<th>adversarial (ours)</th><th>natural (paper)</th><th>adversarial (paper)</th><th>seeds</th>"
                "<th>runs</th></tr>"
            )
            for r in ds["table2"]:
                out.append(
                    f"<tr><td>{e(r['student'])}</td>{cell(r['natural'], r['runs'])}"
                    f"{cell(r['adversarial'], r['runs'])}<td>{e(r['paper_natural'])}</td>"
                    f"<td>{e(r['paper_adversarial'])}</td><td>{r['n']}</td><td>{refs(r['runs'])}</td></tr>"
                )
            out.append("</table>")
            if ds["teacher_error"]:
                out.append(
                    f"<p>AT teacher's training-set error: {e(ds['teacher_error'])}% "
                    f"(paper: {TEACHER_TRAIN_ERROR}%).</p>"
                )
        out.append("<h3>Figures</h3>")
        for f in ds["figures"]:
            out.append(
                f'<figure><img src="figures/{e(f["file"])}" alt="{e(f["title"])}">'
                f'<figcaption>{e(f["title"])} (<a href="{e(links[f["run"]])}">run</a>)</figcaption></figure>'
            )
    out += html_lines(sections["provenance"], e)
    out.append(HTML_SCRIPT + "</body></html>")
    return "\n".join(out)
