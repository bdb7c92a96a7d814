"""``autosp plan``: the largest trainable sequence length for a memory size, by tracing the
parallelized step on fake tensors (Note [Planning by tracing] in ``trace.py``)."""

from autosp.plan.planner import Plan, PlanSettings, plan
from autosp.plan.presets import PRESETS, plan_config

__all__ = ["PRESETS", "Plan", "PlanSettings", "plan", "plan_config"]
