"""The checks layer: what a run can prove about a user's setup before it trains (issue 22), each
check a module: `regularizers` (--check_regularizers), with `coverage` (which regularizer covers
each weight), `gradients` (their gradients reach the update, once, as their closed forms), `moves`
(the update moves each weight against them) and `kept` (the state put back afterwards);
`equivalence` (--check_equivalence: the first update on the run's strategy against one device's),
with `differences` (each value's difference, the factor that explains one, the verdict); and
`agreement`, by which the workers of a cluster all fail a check or none.

Rules: a check runs the model layer's own math (the replica step, the optimizer) and writes no
files, so it imports nothing from `outputs`, `training` or `study`; `training.preflight` calls it and
records its verdict.
"""
