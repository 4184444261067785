"""The regularization study: its plans, its jobs, each run's numbers, the conclusions, their write-up and the
figures; `python -m train_loop.study` runs it.

Rules: it runs trainings (through `training.run.train` or `python -m train_loop` processes),
never a step, so it imports neither `model.steps` nor `model.loop_calls`.
"""
