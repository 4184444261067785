"""The bench: train_loop against Keras `model.fit`, side by side, with a roofline (`main`, the
tool and its flags; `contenders`, what each process times; `table`, the figures; `roofline`, the
FLOP count). The flags live in `main`, not here, so that importing `table` or `contenders`
defines no flag beside the training tool's (both define `--dataset`)."""
