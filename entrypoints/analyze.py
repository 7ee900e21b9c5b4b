"""MLproject entry point `analyze`: `-P mode=theory` (Appendix C), `gap` (Figure 2, attack runs as
`-P runs=ID,ID`), `ranks` (Figure 3A/B), `errors` (3C), `overlap` (3D/B.6), `images` (B.2/B.3) or
`manifold` (Figure 5); models as `-P models=a,b`, groups as `-P groups="ST=a,b;AT=c,d"`.

MLproject passes every parameter; this thin layer hands the relevant ones to the CLI command.
"""

import re

import typer

from robustlogits.cli import (analyze_errors, analyze_gap, analyze_images, analyze_manifold, analyze_overlap,
                              analyze_ranks, analyze_theory, single_command)

MODES = ("theory", "gap", "ranks", "errors", "overlap", "images", "manifold")


def analyze(mode: str = "theory", runs: str = "", models: str = "", groups: str = "", class_name: str = "",
            classes: str = "10,100", error_rate: float = 0.196, out: str = "", n_images: int = 50,
            n_perturbations: int = 50, n_features: int = 500, pgd_steps: int = 5):
    group = [g for g in re.split(r"[;\s]+", groups or "") if g]
    common = dict(models=models, more_models=None, group=group, dataset=None, data_dir=None,
                  out=out or f"outputs/{mode}", track=True, device="auto")
    if mode == "theory":
        analyze_theory(classes=classes, error_rate=error_rate, omega_correct=1.0, omega_wrong=1.0, runs=runs,
                       out=out or "outputs/theory", track=True)
    elif mode == "manifold":
        analyze_manifold(models=models, more_models=None, n_images=n_images, n_perturbations=n_perturbations,
                         n_features=n_features, eps="8/255", pgd_steps=pgd_steps, simulated=False,
                         definitions="reference", center_method="reference", center_reps=10, seed=0,
                         dataset=None, data_dir=None, out=out or "outputs/manifold", track=True, device="auto")
    elif mode == "gap":
        analyze_gap(runs=runs, bins=10, max_gap=None, out=out or "outputs/gap", track=True)
    elif mode == "ranks":
        analyze_ranks(class_name=class_name, score="softmax", target="label", **common)
    elif mode == "errors":
        analyze_errors(attack_runs=runs, **common)
    elif mode == "overlap":
        analyze_overlap(seed=0, **common)
    elif mode == "images":
        analyze_images(class_name=class_name, score="softmax", per_quadrant=16, seed_classes=None, n_neighbours=5,
                       n_random_seeds=1000, seed=0, **common)
    else:
        typer.echo(f"error: unknown mode {mode!r}; choose {', '.join(MODES)}", err=True)
        raise typer.Exit(2)


if __name__ == "__main__":
    single_command(analyze)()
