"""``autosp plan``: the largest trainable sequence length for a memory size, by tracing the
parallelized step on fake tensors (Note [Planning by tracing] in ``trace.py``).

``planner.plan(config, PlanSettings(...))`` is the API; ``presets.plan_config`` gives the
configs of the presets; ``command`` is the command line (it imports nothing heavy until it
runs)."""
