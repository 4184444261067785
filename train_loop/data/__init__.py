"""The data layer: finding, reading and checking the data sets (NumPy: `sources`, which reads a
named set through `named_sets`, an npz through `npz` and IDX files through `idx`; `arrays`
checks), the `tf.data` pipelines that feed the replicas (`inputs`), and streamed data: an input
function's datasets (`streams`) and a folder of TFRecord shards (`tfrecords`).

Rules: it imports nothing from `model`, `outputs`, `training` or `study`, and no TensorFlow
outside `inputs`, `streams` and `tfrecords`, so that a bad array data set is refused before
TensorFlow starts. The bundled digits (`digits.npz`) live here too.
"""
