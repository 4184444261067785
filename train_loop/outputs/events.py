"""A run's event files on disk: a scalar read back through TensorBoard's own loader, the records
read frame by frame, and a resumed run's files cut back to the step it resumes from."""

from __future__ import annotations

import glob
import os

import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from train_loop import files
from train_loop.outputs.stderr import warn
from train_loop.outputs.summaries import WRITERS, writer_dir


def scalar_series(run_dir: str, writer: str, tag: str) -> dict[int, float]:
    """A scalar as `write_scalars` logged it, by step, read back by TensorBoard's own loader (so
    what a figure draws is what TensorBoard shows); empty when the run never logged it."""
    accumulator = event_accumulator.EventAccumulator(
        writer_dir(run_dir, writer), size_guidance={event_accumulator.TENSORS: 0}
    ).Reload()
    if tag not in accumulator.Tags()["tensors"]:
        return {}
    return {event.step: float(tf.make_ndarray(event.tensor_proto)) for event in accumulator.Tensors(tag)}


def drop_events_after(run_dir: str, step: int | None) -> None:
    """Removes from the run's event files everything logged after `step`.

    A run resumed from its checkpoint at `step` logs the steps after it again; without this,
    TensorBoard would show those steps twice (from the killed process and from the resumed one).
    `step` None (a restart with no checkpoint) removes the event files altogether. A record cut
    short by a kill is dropped too, and so is a damaged one (said in one line), while the intact
    records after it are kept. So are all test events: the test split is scored once, at the end
    of a run, which then writes `result.json`; a run that resumes did not get that far.
    """
    for name in WRITERS:
        last = None if name == "test" else step
        for path in glob.glob(os.path.join(writer_dir(run_dir, name), "events.out.tfevents.*")):
            if last is None:
                os.remove(path)
                continue
            records, damaged = read_records(path)
            kept = [record for record in records if event_pb2.Event.FromString(record).step <= last]
            if damaged:
                warn(f"{path}: skipped {damaged} damaged event record(s); the intact ones around them are kept.")
            if damaged or len(kept) < len(records):
                _rewrite_records(path, kept)


def read_records(path: str) -> tuple[list[bytes], int]:
    """The records of a TFRecord file whose checksums hold, and how many were skipped or cut short.

    TensorFlow's readers (`tf.data.TFRecordDataset`, `tf.compat.v1.io.tf_record_iterator`) stop at
    the first bad record, losing every intact one after it; so the frames are read here: a length
    (8 bytes, little-endian) and its masked CRC-32C (4), the data and its masked CRC-32C (4). A
    record whose data fails its checksum is skipped; a length that fails its own leaves no way to
    find the next frame, so the rest of the file counts as one damaged record.
    """
    with open(path, "rb") as stream:
        content = stream.read()
    records, damaged, offset = [], 0, 0
    while offset < len(content):
        header = content[offset : offset + 12]
        length = int.from_bytes(header[:8], "little")
        if len(header) < 12 or _crc(header[:8]) != header[8:]:
            return records, damaged + 1
        data = content[offset + 12 : offset + 12 + length]
        checksum = content[offset + 12 + length : offset + 16 + length]
        offset += 16 + length
        if len(checksum) < 4 or _crc(data) != checksum:
            damaged += 1
        elif _parses(data):
            records.append(data)
        else:
            damaged += 1
    return records, damaged


def _crc(data: bytes) -> bytes:
    return masked_crc32c(data).to_bytes(4, "little")


def _parses(data: bytes) -> bool:
    try:
        event_pb2.Event.FromString(data)
    except DecodeError:
        return False
    return True


def _rewrite_records(path: str, records: list[bytes]) -> None:
    """Through a temporary name, so a kill now leaves the old file or the new one. The name lacks
    "tfevents", so TensorBoard never reads a half-written one."""

    def write(temporary: str) -> None:
        with tf.io.TFRecordWriter(temporary) as writer:
            for record in records:
                writer.write(record)

    files.write_atomically(path, write, temporary=os.path.join(os.path.dirname(path), "rewriting-events.tmp"))
