"""A variational autoencoder on Fashion-MNIST as a task: two loss terms, the reconstruction and the
KL divergence, logged apart (`loss/reconstruction`, `loss/kl`) beside their total, as the keras-io
VAE example overrides `train_step` to do. Run from the repository root (Debian's
dataset-fashion-mnist package, or Keras' cache, holds the images):

    python -m train_loop --task=examples/vae.py:VAE --dataset=fashion_mnist --epochs=1 --batch_size=128

The batches' labels are never read: `split` gives the images alone, and no targets.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from train_loop.model.dropout import ExampleNoise

LATENT = 8


@keras.saving.register_keras_serializable(package="vae")
class Sampling(ExampleNoise):
    """z = mean + exp(log_var / 2) * noise in training; the mean alone otherwise, so that an
    evaluation scores the same reconstruction every time.

    The noise is `ExampleNoise`'s: an example's depends on the step and its place in the batch,
    not on the replica that runs it, so 1 device, 2 replicas, 2 workers and a resumed run train
    the same VAE (a Keras seed generator draws the same noise on every replica instead).
    """

    def __init__(self, seed: int = 1, **kwargs):
        super().__init__(seed=seed, **kwargs)

    def call(self, mean, log_var, training=False):
        if not training:
            return mean
        return mean + tf.exp(0.5 * log_var) * tf.cast(self.normal(mean), mean.dtype)


class VAE:
    """The task: its model, and its two terms per example (summed over pixels and latent units)."""

    def model(self) -> keras.Model:
        images = keras.Input((28, 28, 1))
        hidden = keras.layers.Dense(256, activation="relu", name="encoder")(keras.layers.Flatten()(images))
        mean = keras.layers.Dense(LATENT, name="mean")(hidden)
        log_var = keras.layers.Dense(LATENT, name="log_var")(hidden)
        latent = Sampling(name="sampling")(mean, log_var)
        decoded = keras.layers.Dense(256, activation="relu", name="decoder")(latent)
        logits = keras.layers.Reshape((28, 28, 1))(keras.layers.Dense(28 * 28, name="pixels")(decoded))
        return keras.Model(images, {"logits": logits, "mean": mean, "log_var": log_var}, name="vae")

    def split(self, batch):
        return batch[0], None

    def loss_terms(self, batch, outputs):
        images = batch[0]
        pixels = tf.nn.sigmoid_cross_entropy_with_logits(labels=images, logits=outputs["logits"])
        mean, log_var = outputs["mean"], outputs["log_var"]
        kl = -0.5 * tf.reduce_sum(1 + log_var - tf.square(mean) - tf.exp(log_var), axis=-1)
        return {"reconstruction": tf.reduce_sum(pixels, axis=[1, 2, 3]), "kl": kl}
