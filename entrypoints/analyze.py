"""MLproject entry point `analyze`: the `robustlogits analyze` commands (theory, manifold)."""

from robustlogits.cli import analyze_app

if __name__ == "__main__":
    analyze_app()
