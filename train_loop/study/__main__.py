"""`python -m train_loop.study`: runs the study's absl app (see `study.study`)."""

from train_loop.study import study

if __name__ == "__main__":
    study.run()
