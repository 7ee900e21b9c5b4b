"""Print docs/claims.md."""

from robustlogits.study.reproduce.claims import markdown

print(markdown(), end="")
