"""Criteria: knowledge distillation from a teacher (registers label_smoothed_cross_entropy_distill)."""
from . import distill  # noqa: F401
