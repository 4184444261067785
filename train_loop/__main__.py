"""`python -m train_loop`: runs the absl app in `cli`."""

from absl import flags

from train_loop import cli

# --helpshort lists the main module's flags; the training flags live in cli.
flags.adopt_module_key_flags(cli)

if __name__ == "__main__":
    cli.run()
