"""The paper's reported numbers, shown beside ours in the report's Tables 1 and 2.

Numbers are read from the paper's text. Table 1's CIFAR-10 natural accuracies and CIFAR-100
adversarial accuracies are illegible in our copy of the paper, so those cells say so rather than
guess. The claims, with their rules, live in `claims/`.
"""

from __future__ import annotations

# (dataset, model) -> (natural, adversarial) as "mean ± std" strings in percent; None: illegible.
TABLE1 = {
    ("cifar10", "st"): (None, "0.00 ± 0.00"),
    ("cifar10", "at"): (None, "41.5 ± 0.63"),
    ("cifar100", "st"): ("76.1 ± 0.58", None),
    ("cifar100", "at"): ("49.1 ± 0.85", None),
}
# student -> (natural, adversarial), CIFAR-10, ResNet-18 students of the epoch-40 AT teacher.
TABLE2 = {
    "normal": ("75.2 ± 0.30", "30.4 ± 0.34"),
    "permute-k1": ("77.6 ± 0.6", "13.3 ± 2.0"),
    "correct-fix-1": ("92.1 ± 0.19", "0.1 ± 0.05"),
    "hybrid": ("87.86 ± 0.19", "0.00 ± 0.00"),
}
TABLE2_LABELS = {
    "normal": "Normal",
    "permute-k1": "Fix-1 (perm)",
    "correct-fix-1": "Correct-fix-1 (perm)",
    "hybrid": "Hybrid ST-AT",
}
TEACHER_TRAIN_ERROR = "19.6 ± 0.6"  # section 4.2: AT teacher's error on the training set, percent
