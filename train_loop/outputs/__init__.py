"""The outputs layer: the run folder and its lock, checkpoints, TensorBoard's event files, the
metrics file, the saved models, and the leaf helpers that write a file safely (`files`) and
keep stderr to one line (`stderr`).

Rules: it writes what it is handed and measures nothing, so it imports nothing from `training`
or `study`.
"""
