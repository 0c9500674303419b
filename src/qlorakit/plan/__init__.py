"""`qlorakit plan`: peak memory per device of a training config, before any weights are loaded.

estimate.py holds the formulas (model shapes -> bytes), advice.py what to change when a plan
does not fit, report.py the table. bench/plan_accuracy.py calibrates them against the peak RSS of
`qlorakit train`.
"""
