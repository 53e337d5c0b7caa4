"""Backbones, projector head and the multi-crop BAM wrapper (flax.nnx); ``build_model`` makes one.

Everything here is written to be used functionally by the trainer:
``graphdef, state = nnx.split(model)`` once, then a jitted function of
``(graphdef, state)`` that does ``nnx.merge`` inside and returns the updated
``nnx.state(model)`` (batch statistics and the drop-path RNG counter change
during a training forward pass). When the merge happens inside ``jax.grad``
with the non-differentiated state passed in from outside, use
``nnx.merge(..., copy=True)``: flax refuses to mutate variables created at
another trace level.

Train/eval mode is a call-time argument, never module state:
``deterministic=False`` means "training" (drop path active, BatchNorm uses and
updates batch statistics); ``deterministic=True`` means "eval" (no drop path,
BatchNorm uses running averages). Keeping it out of the module attributes means
one graphdef serves both modes.
"""
from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from bam_jax.models.caformer import CAFORMER_PRESETS, CAFormer
from bam_jax.models.convnet import ConvNet, Pixels
from bam_jax.models.projector import Projector
from bam_jax.models.vit import VIT_PRESETS, Frozen, VisionTransformer

__all__ = ["BAMModel", "CAFORMER_PRESETS", "CAFormer", "ConvNet", "Frozen", "Pixels", "Projector", "VIT_PRESETS", "VisionTransformer",
           "build_model"]

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


class BAMModel(nnx.Module):
    """Backbone + projector over multi-crop views.

    The backbone runs once per resolution group (all global crops folded into
    the batch, then all local crops); the projector runs once on every view so
    its BatchNorm statistics cover all views, as in the official
    MultiCropWrapper. Folding is batch-major ('(b v)'), so a batch sharded over
    devices stays sharded the same way.
    """

    def __init__(self, backbone: VisionTransformer | CAFormer | ConvNet | Pixels,
                 projector: Projector):
        self.backbone = backbone
        self.projector = projector

    def __call__(self, global_crops, local_crops=None, *, deterministic: bool = True) -> jax.Array:
        """global_crops [B,G,H,W,C], local_crops [B,L,h,w,C] or None -> z [B, G+L, out_dim] (globals first)."""
        groups = [global_crops] if local_crops is None else [global_crops, local_crops]
        feats = []
        for crops in groups:
            flat = einops.rearrange(crops, 'b v h w c -> (b v) h w c')
            out = self.backbone(flat, deterministic=deterministic)
            feats.append(einops.rearrange(out, '(b v) d -> b v d', v=crops.shape[1]))
        feats = jnp.concatenate(feats, axis=1)
        z = self.projector(einops.rearrange(feats, 'b v d -> (b v) d'), deterministic=deterministic)
        return einops.rearrange(z, '(b v) d -> b v d', v=feats.shape[1])

    def embed(self, images) -> jax.Array:
        """Eval-mode backbone feature [B, width] used for kNN."""
        return self.backbone(images, deterministic=True)

    def spatial_map(self, images) -> jax.Array:
        """The backbone's eval-mode spatial map [B, h, w], for ContrastiveCrop boxes."""
        if not hasattr(self.backbone, 'spatial_map'):
            raise ValueError(f'ContrastiveCrop needs a spatial map, which the '
                             f'{type(self.backbone).__name__} backbone has not; use a ViT, CAFormer '
                             f'or ConvNet backbone or set --config.ccrop.enabled=False')
        return self.backbone.spatial_map(images)


def build_model(model_config: ml_collections.ConfigDict, *, num_channels: int, image_size: int,
                rngs: nnx.Rngs) -> BAMModel:
    """Builds the BAM model; ``image_size`` is the global-crop size the ViT position table is built for.

    ``rngs`` must provide a 'params' stream (or a default one) and, when
    ``drop_path_rate > 0``, a 'dropout' stream (falls back to the default).
    """
    cfg = model_config
    dtype, param_dtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    if cfg.backbone == 'vit':
        if cfg.vit_variant == 'custom':
            width, depth, heads = cfg.width, cfg.depth, cfg.num_heads
        elif cfg.vit_variant in VIT_PRESETS:
            width, depth, heads = VIT_PRESETS[cfg.vit_variant]
        else:
            raise ValueError(f'unknown vit_variant {cfg.vit_variant!r}')
        backbone = VisionTransformer(
            image_size=image_size, patch_size=cfg.patch_size, in_channels=num_channels, width=width,
            depth=depth, num_heads=heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
            drop_path_rate=cfg.drop_path_rate, freeze_patch_embed=cfg.freeze_patch_embed,
            remat=cfg.remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    elif cfg.backbone == 'caformer':
        c = cfg.caformer
        if c.variant == 'custom':
            depths, dims = tuple(c.depths), tuple(c.dims)
        elif c.variant in CAFORMER_PRESETS:
            depths, dims = CAFORMER_PRESETS[c.variant]
        else:
            raise ValueError(f'unknown caformer variant {c.variant!r}')
        backbone = CAFormer(
            in_channels=num_channels, depths=depths, dims=dims, act=c.act, res_scale=c.res_scale,
            qkv_bias=c.qkv_bias, drop_path_rate=cfg.drop_path_rate, remat_every=c.remat_every,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    elif cfg.backbone == 'convnet':
        backbone = ConvNet(in_channels=num_channels, channels=tuple(cfg.convnet.channels),
                           strides=tuple(cfg.convnet.strides), norm=cfg.convnet.norm,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    elif cfg.backbone == 'pixels':
        backbone = Pixels(image_size=image_size, in_channels=num_channels)
    else:
        raise ValueError(f'unknown backbone {cfg.backbone!r}')
    p = cfg.projector
    projector = Projector(backbone.embed_dim, n_layers=p.n_layers, hidden_dim=p.hidden_dim,
                          out_dim=p.out_dim, act=p.act, use_bn=p.use_bn, last_bn=p.last_bn, bias=p.bias,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return BAMModel(backbone, projector)
