"""The model layer: the networks, the loss terms, the optimizer, the best model, the train state
(`state`) and the traced step (`steps`).

Rules: it writes no files and runs no loop, so it imports nothing from `outputs`, `training` or
`study`; whoever saves the state builds the checkpoint from `TrainState.trackables()`.
"""
