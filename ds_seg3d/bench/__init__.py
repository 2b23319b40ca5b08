"""Memory planning and measurement: what each rank of a pipelined run needs, before and after launch.

``spec`` (one configuration), ``calibrate`` (stage replay on slabs), ``memory_model`` (the planner's
model), ``measure`` (per-rank peaks), ``point`` (the rank script), ``sweep`` / ``report`` /
``charts`` (``ds-seg3d bench memory``) and ``plan`` (``ds-seg3d plan``).
"""
