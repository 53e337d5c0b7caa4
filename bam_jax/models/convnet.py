"""Convolutional backbones for small images, and the raw-pixel baseline (flax.nnx)."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class ConvNet(nnx.Module):
    """Small conv backbone (3x3 conv -> norm -> ReLU per stage, global average pool) for MNIST-scale runs."""

    def __init__(self, *, in_channels: int, channels: Sequence[int] = (32, 64, 128, 256),
                 strides: Sequence[int] = (1, 2, 2, 1), norm: str = 'batch',
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if len(channels) != len(strides):
            raise ValueError('convnet channels and strides must have the same length')
        if norm not in ('batch', 'group'):
            raise ValueError(f'unknown convnet norm {norm!r}')
        self.embed_dim = channels[-1]
        self.strides = tuple(strides)
        self.norm_kind = norm
        convs, norms = [], []
        c_in = in_channels
        for c_out, stride in zip(channels, strides):
            convs.append(nnx.Conv(c_in, c_out, (3, 3), strides=stride, padding='SAME', use_bias=False,
                                  kernel_init=nnx.initializers.kaiming_normal(),
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            if norm == 'batch':
                norms.append(nnx.BatchNorm(c_out, momentum=0.9, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            else:
                norms.append(nnx.GroupNorm(c_out, num_groups=math.gcd(32, c_out), epsilon=1e-5,
                                           dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            c_in = c_out
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

    def feature_dim(self, n_last_blocks: int = 1, avgpool: bool = False) -> int:
        return self.embed_dim

    def _feature_map(self, x, deterministic: bool) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            x = norm(x, use_running_average=deterministic) if self.norm_kind == 'batch' else norm(x)
            x = jax.nn.relu(x)
        return x

    def __call__(self, x, *, deterministic: bool = True) -> jax.Array:
        """Images [B,H,W,C] -> pooled feature [B, channels[-1]] (float32)."""
        return self._feature_map(x, deterministic).mean(axis=(1, 2)).astype(jnp.float32)

    @property
    def feature_stride(self) -> int:
        return math.prod(self.strides)

    def patch_features(self, x) -> jax.Array:
        """Eval-mode last feature map [B, h, w, channels[-1]] (float32): per-location features
        for video segmentation."""
        return self._feature_map(x, True).astype(jnp.float32)

    def spatial_map(self, x) -> jax.Array:
        """Where the model looks [B, h, w]: the last feature map summed over channels (the
        original ContrastiveCrop's map for convnets)."""
        return self._feature_map(x, True).sum(axis=-1).astype(jnp.float32)

    def features(self, x, *, n_last_blocks: int = 1, avgpool: bool = False) -> jax.Array:
        """Eval-mode pooled feature; the ViT-only arguments have no ConvNet meaning and are ignored."""
        return self(x, deterministic=True)


class Pixels(nnx.Module):
    """The raw-pixel baseline as a backbone without parameters: the flattened image.

    kNN and the linear probe then measure what the pixels alone know, with the same commands
    that evaluate a pretrained backbone (`--random_init` with `model.backbone='pixels'`).
    """

    def __init__(self, *, image_size: int, in_channels: int):
        self.embed_dim = image_size * image_size * in_channels

    def feature_dim(self, n_last_blocks: int = 1, avgpool: bool = False) -> int:
        return self.embed_dim

    def __call__(self, x, *, deterministic: bool = True) -> jax.Array:
        return x.reshape(x.shape[0], -1).astype(jnp.float32)

    def features(self, x, *, n_last_blocks: int = 1, avgpool: bool = False) -> jax.Array:
        return self(x)
