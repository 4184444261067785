"""The model layer: the networks (`models`, a user's in `user_models`, `dropout`), the loss terms,
the optimizer, the best model, the train state (`state`), the step (`steps`) and the traced loops
over it (`loop_calls`).

Rules: it writes no files and runs no loop, so it imports nothing from `outputs`, `training` or
`study`; whoever saves the state builds the checkpoint from `TrainState.trackables()`.
"""
