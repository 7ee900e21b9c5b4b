"""robustlogits: reproduce and extend "Understanding the Logit Distributions of
Adversarially-Trained Deep Neural Networks" with MLflow-tracked experiments."""

from robustlogits.core.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
