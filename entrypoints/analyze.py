"""MLproject entry point `analyze`: `-P mode=theory` (Appendix C), `manifold` (Figure 5) or
`gap` (Figure 2, from attack runs given as `-P runs=ID,ID`).

MLproject passes every parameter; this thin layer hands the relevant ones to the CLI command.
"""

import typer

from robustlogits.cli import analyze_gap, analyze_manifold, analyze_theory, single_command


def analyze(mode: str = "theory", runs: str = "", models: str = "", classes: str = "10,100",
            error_rate: float = 0.196, out: str = "", n_images: int = 50, n_perturbations: int = 50,
            n_features: int = 500, pgd_steps: int = 5):
    if mode == "theory":
        analyze_theory(classes=classes, error_rate=error_rate, omega_correct=1.0, omega_wrong=1.0, runs=runs,
                       out=out or "outputs/theory", track=True)
    elif mode == "manifold":
        analyze_manifold(models=models, more_models=None, n_images=n_images, n_perturbations=n_perturbations,
                         n_features=n_features, eps="8/255", pgd_steps=pgd_steps, simulated=False, seed=0,
                         dataset=None, data_dir=None, out=out or "outputs/manifold", track=True, device="auto")
    elif mode == "gap":
        analyze_gap(runs=runs, bins=10, max_gap=None, out=out or "outputs/gap", track=True)
    else:
        typer.echo(f"error: unknown mode {mode!r}; choose theory, manifold or gap", err=True)
        raise typer.Exit(2)


if __name__ == "__main__":
    single_command(analyze)()
