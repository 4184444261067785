"""The training layer: `run.train(config)`, which wires a run top to bottom, the eager outer loop
(`controller`) and its periodic `actions`, signals, timing, the console, the strategy, the meeting
of workers, the XLA choice, and the checks made before training (`preflight`).

Rules: it imports nothing from `study` or the entry points (`cli`, `apps`, `launch`, `bench`,
`compare`); the layers below it are its to use.
"""
