"""The logdir's HParams experiment: which settings differ between its runs, then their final
metrics, so that TensorBoard's HParams table opens on what was compared."""

from __future__ import annotations

import contextlib
import glob
import os

import tensorflow as tf
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import api as hparams_api
from tensorboard.plugins.hparams import metadata as hparams_metadata

from train_loop.outputs.events import read_records

# What the HParams table compares after the settings that differ: the runs' final metrics.
COMPARED_METRICS = (
    ("validation", "accuracy"),
    ("validation", "loss/cross_entropy"),
    ("test", "accuracy"),
    ("test", "loss/cross_entropy"),
    ("train", "loss/cross_entropy"),
    ("train", "loss/regularization"),
    ("train", "accuracy"),
)


_EXPERIMENT_SUFFIX = ".experiment"


def write_logdir_experiment(run_dir: str) -> None:
    """The HParams experiment of the runs in `run_dir`'s logdir (a study's folder too): the
    settings that differ between them, then their final metrics. Without it TensorBoard lists
    every setting, most of them the same in every run, before any metric.

    TensorBoard takes the experiment from whichever run holds one, so the logdir keeps one: in
    the newest run (in the logdir itself it would show as a run named `.`), removed from the
    others. A single run has nothing to compare: TensorBoard then lists its settings.
    """
    logdir = os.path.dirname(os.path.abspath(run_dir))
    sessions = [hparams for hparams in map(_session_hparams, glob.glob(os.path.join(logdir, "*"))) if hparams]
    for path in glob.glob(os.path.join(logdir, "*", f"events.out.tfevents.*{_EXPERIMENT_SUFFIX}")):
        with contextlib.suppress(FileNotFoundError):  # Another run of the logdir, starting now, removed it.
            os.remove(path)
    if len(sessions) < 2:
        return
    differ = sorted(name for name in set().union(*sessions) if len({hparams.get(name) for hparams in sessions}) > 1)
    writer = tf.summary.create_file_writer(run_dir, filename_suffix=_EXPERIMENT_SUFFIX)
    with writer.as_default(step=0):
        hparams_api.hparams_config(
            hparams=[hparams_api.HParam(name) for name in differ],
            metrics=[
                hparams_api.Metric(tag, group=group, display_name=f"{group} {tag}") for group, tag in COMPARED_METRICS
            ],
        )
    writer.close()


def _session_hparams(run_dir: str) -> dict[str, bytes]:
    """The settings a run logged for HParams (`write_settings`), each value serialized so that
    they compare; empty for a folder that holds no run."""
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        for record in read_records(path)[0]:
            for value in event_pb2.Event.FromString(record).summary.value:
                if value.tag == hparams_metadata.SESSION_START_INFO_TAG:
                    info = hparams_metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
                    return {
                        name: setting.SerializeToString(deterministic=True) for name, setting in info.hparams.items()
                    }
    return {}
