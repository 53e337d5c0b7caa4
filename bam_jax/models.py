"""Backbones, projector head and the multi-crop BAM wrapper (flax.nnx).

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

Frozen tensors (the fixed sin-cos position embedding and, as in the official
MoCo-v3-style ViT, the randomly initialised patch projection) are stored as
:class:`Frozen` variables, not ``nnx.Param``: an optimizer built with
``wrt=nnx.Param`` (or a grad taken w.r.t. the ``nnx.Param`` sub-state) never
sees them. They are also read through ``jax.lax.stop_gradient`` so even a
gradient w.r.t. the whole state is exactly zero for them.
"""
from __future__ import annotations

import math
from typing import Sequence

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

LN_EPS = 1e-6

VIT_PRESETS = {
    # name: (width, depth, num_heads)
    'tiny': (192, 12, 3),
    'small': (384, 12, 12),  # the official BAM vit_small has 12 heads (timm's has 6)
    'base': (768, 12, 12),
    'large': (1024, 24, 16),
}

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


class Frozen(nnx.Variable):
    """A non-trainable tensor: not an ``nnx.Param``, so optimizers skip it."""


def default_model_config() -> ml_collections.ConfigDict:
    """Model fields of the experiment config (``config.model``).

    For ``vit_variant`` other than 'custom' the preset fixes width/depth/num_heads
    and the three explicit fields are ignored.
    """
    cfg = ml_collections.ConfigDict()
    cfg.backbone = 'vit'  # 'vit' | 'convnet' | 'pixels' (the raw-pixel baseline)
    cfg.vit_variant = 'small'  # 'tiny' | 'small' | 'base' | 'large' | 'custom'
    cfg.width = 384
    cfg.depth = 12
    cfg.num_heads = 12
    cfg.patch_size = 16
    cfg.mlp_ratio = 4.0
    cfg.qkv_bias = True
    cfg.drop_path_rate = 0.0
    cfg.freeze_patch_embed = True
    cfg.remat = False
    cfg.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16'
    cfg.param_dtype = 'float32'

    cfg.projector = ml_collections.ConfigDict()
    cfg.projector.n_layers = 3
    cfg.projector.hidden_dim = 4096
    cfg.projector.out_dim = 4096
    cfg.projector.act = 'gelu'  # 'gelu' | 'relu'
    cfg.projector.use_bn = True
    cfg.projector.last_bn = True
    cfg.projector.bias = True

    cfg.convnet = ml_collections.ConfigDict()
    cfg.convnet.channels = (32, 64, 128, 256)
    cfg.convnet.strides = (1, 2, 2, 1)
    cfg.convnet.norm = 'batch'  # 'batch' | 'group'
    return cfg


# ----------------------------------------------------------------------------
# Position embedding helpers (numpy, evaluated at trace time: static shapes)
# ----------------------------------------------------------------------------

def sincos_pos_embed(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """2-D sin-cos table [1 + gh*gw, dim] with a zero row for the CLS token.

    Token (r, c) (row-major, as the patches are flattened) gets
    ``[sin(r w), cos(r w), sin(c w), cos(c w)]``. This equals the official table
    for square grids (the only case it is used with).
    """
    if dim % 4:
        raise ValueError(f'width {dim} must be divisible by 4 for the 2-D sin-cos embedding')
    quarter = dim // 4
    omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float32) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float32),
                             np.arange(grid_w, dtype=np.float32), indexing='ij')
    out_r = rows.reshape(-1)[:, None] * omega[None]
    out_c = cols.reshape(-1)[:, None] * omega[None]
    table = np.concatenate([np.sin(out_r), np.cos(out_r), np.sin(out_c), np.cos(out_c)], axis=1)
    return np.concatenate([np.zeros((1, dim), np.float32), table], axis=0).astype(np.float32)


def _cubic_weight(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix reproducing torch ``F.interpolate(mode='bicubic', antialias=True)``.

    That is how the official ViT (timm's ``resample_abs_pos_embed``) resizes its position table
    for crops of another size: a cubic kernel with a=-0.5, widened by the scale when shrinking
    (antialiasing), taps renormalised at the borders. 2-D bicubic is the product of two of these.
    """
    scale = in_size / out_size
    support, inverse_scale = (2.0 * scale, 1.0 / scale) if scale >= 1.0 else (2.0, 1.0)
    mat = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        weights = _cubic_weight((np.arange(lo, hi) - center + 0.5) * inverse_scale)
        mat[i, lo:hi] = weights / weights.sum()
    return mat.astype(np.float32)


def _patchify(x: jax.Array, p: int) -> tuple[jax.Array, int, int]:
    """[B,H,W,C] -> [B, gh*gw, p*p*C]; a remainder smaller than a patch is dropped like a strided conv."""
    gh, gw = x.shape[1] // p, x.shape[2] // p
    x = x[:, :gh * p, :gw * p]
    return einops.rearrange(x, 'b (h p1) (w p2) c -> b (h w) (p1 p2 c)', p1=p, p2=p), gh, gw


# ----------------------------------------------------------------------------
# Vision Transformer
# ----------------------------------------------------------------------------

def _qkv_init(key, shape, dtype=jnp.float32):
    """MoCo-v3 init of the fused qkv kernel: Xavier-uniform for q, k and v separately."""
    fan_in, fan_out = shape[0], shape[1] // 3
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


class Attention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f'width {dim} not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, kernel_init=_qkv_init,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, kernel_init=nnx.initializers.xavier_uniform(),
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _qkv(self, x):
        qkv = einops.rearrange(self.qkv(x), 'b n (three h d) -> three b n h d',
                               three=3, h=self.num_heads)
        return qkv[0], qkv[1], qkv[2]

    def __call__(self, x):
        q, k, v = self._qkv(x)
        out = jax.nn.dot_product_attention(q, k, v)
        return self.proj(einops.rearrange(out, 'b n h d -> b n (h d)'))

    def probabilities(self, x):
        """Softmax attention matrix [B, heads, N, N] in float32."""
        q, k, _ = self._qkv(x)
        logits = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32), k.astype(jnp.float32))
        return jax.nn.softmax(logits / math.sqrt(self.head_dim), axis=-1)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.xavier_uniform()
        self.fc1 = nnx.Linear(dim, hidden, kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        # torch nn.GELU is the exact (erf) GELU.
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm transformer block with per-sample stochastic depth.

    Drop path is an ``nnx.Dropout`` whose mask is broadcast over tokens and
    channels, i.e. one keep/drop decision per sample, scaled by 1/keep like
    timm's DropPath. The block holds no RNG state: the ViT hands it a key, so a
    rematerialised block is a pure function (recomputation redraws the same masks).
    """

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, qkv_bias: bool,
                 drop_path: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.drop_path1 = nnx.Dropout(drop_path, broadcast_dims=(1, 2))
        self.drop_path2 = nnx.Dropout(drop_path, broadcast_dims=(1, 2))

    def __call__(self, x, deterministic: bool = True, key: jax.Array | None = None):
        """``key`` is required only when ``deterministic`` is False and the drop-path rate is > 0."""
        k1, k2 = (None, None) if key is None else tuple(jax.random.split(key))
        x = x + self.drop_path1(self.attn(self.norm1(x)), deterministic=deterministic, rngs=k1)
        x = x + self.drop_path2(self.mlp(self.norm2(x)), deterministic=deterministic, rngs=k2)
        return x


def _run_block(block: Block, x, deterministic: bool, key):
    return block(x, deterministic, key)


_run_block_remat = nnx.remat(_run_block, static_argnums=(2,))


class VisionTransformer(nnx.Module):
    """ViT with CLS token, fixed 2-D sin-cos position embedding and a frozen patch projection.

    Mirrors the official BAM ViT (timm ViT + MoCo-v3 tricks): the patch
    projection keeps its random init and is never trained when
    ``freeze_patch_embed`` (the official setting); the position table is built
    for ``image_size`` and bicubically resampled (torch-compatible) for other
    crop sizes, the CLS entry (zeros) being kept as is.
    """

    def __init__(self, *, image_size: int, patch_size: int = 16, in_channels: int = 3,
                 width: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, freeze_patch_embed: bool = True,
                 remat: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.embed_dim = width
        self.depth = depth
        self.remat = remat
        self.dtype = dtype
        self.grid_size = (image_size // patch_size, image_size // patch_size)

        patch_dim = patch_size * patch_size * in_channels
        # torch Conv2d default init (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in)) for weight and bias.
        bound = 1.0 / math.sqrt(patch_dim)
        kernel = jax.random.uniform(rngs.params(), (patch_dim, width), param_dtype, -bound, bound)
        bias = jax.random.uniform(rngs.params(), (width,), param_dtype, -bound, bound)
        var_type = Frozen if freeze_patch_embed else nnx.Param
        self.patch_kernel = var_type(kernel)
        self.patch_bias = var_type(bias)
        self.freeze_patch_embed = freeze_patch_embed

        self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, width), param_dtype))
        self.pos_embed = Frozen(jnp.asarray(sincos_pos_embed(*self.grid_size, width), param_dtype))

        # One stream for all blocks, drawn outside any remat (see Block).
        self.drop_path_rngs = rngs['dropout'].fork() if drop_path_rate > 0 else None
        rates = np.linspace(0.0, drop_path_rate, depth)
        self.blocks = nnx.List([
            Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=float(rate),
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for rate in rates
        ])
        self.norm = nnx.LayerNorm(width, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def feature_dim(self, n_last_blocks: int = 1, avgpool: bool = False) -> int:
        return self.embed_dim * (n_last_blocks + int(avgpool))

    def interpolated_pos_embed(self, grid_h: int, grid_w: int) -> jax.Array:
        """Position table [1 + grid_h*grid_w, width] for a crop with this patch grid."""
        table = jax.lax.stop_gradient(self.pos_embed[...])
        h0, w0 = self.grid_size
        if (grid_h, grid_w) == (h0, w0):
            return table
        grid = table[1:].reshape(h0, w0, -1)
        mh, mw = bicubic_matrix(h0, grid_h), bicubic_matrix(w0, grid_w)
        grid = jnp.einsum('ih,jw,hwd->ijd', mh, mw, grid, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([table[:1], grid.reshape(grid_h * grid_w, -1)], axis=0)

    def _embed(self, x):
        patches, gh, gw = _patchify(x, self.patch_size)
        kernel, bias = self.patch_kernel[...], self.patch_bias[...]
        if self.freeze_patch_embed:
            kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
        tokens = jnp.einsum('bnp,pd->bnd', patches.astype(self.dtype), kernel.astype(self.dtype))
        tokens = tokens + bias.astype(self.dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (x.shape[0], 1, self.embed_dim))
        tokens = jnp.concatenate([cls, tokens], axis=1)
        return tokens + self.interpolated_pos_embed(gh, gw).astype(self.dtype)

    def _forward(self, x, deterministic, n_keep):
        """Returns the (un-normed) outputs of the last ``n_keep`` blocks."""
        x = self._embed(x)
        keys = [None] * self.depth
        if not deterministic and self.drop_path_rngs is not None:
            keys = list(jax.random.split(self.drop_path_rngs(), self.depth))
        outs = []
        for i, block in enumerate(self.blocks):
            if self.remat:
                x = _run_block_remat(block, x, deterministic, keys[i])
            else:
                x = block(x, deterministic, keys[i])
            if i >= self.depth - n_keep:
                outs.append(x)
        return outs

    def __call__(self, x, *, deterministic: bool = True) -> jax.Array:
        """Images [B,H,W,C] -> normed CLS token [B, width] (float32)."""
        (x,) = self._forward(x, deterministic, 1)
        return self.norm(x)[:, 0].astype(jnp.float32)

    def features(self, x, *, n_last_blocks: int = 1, avgpool: bool = False) -> jax.Array:
        """Linear-eval features: normed CLS of the last n blocks (+ mean normed patch token of the last).

        The official script interleaves CLS and average-pool channels; plain
        concatenation is an equivalent permutation for a linear classifier.
        """
        outs = [self.norm(o) for o in self._forward(x, True, n_last_blocks)]
        feats = [o[:, 0] for o in outs]
        if avgpool:
            feats.append(outs[-1][:, 1:].mean(axis=1))
        return jnp.concatenate(feats, axis=-1).astype(jnp.float32)

    def last_self_attention(self, x) -> jax.Array:
        """Attention probabilities of the last block [B, heads, N, N] (CLS row 0), for DINO-style maps."""
        x = self._embed(x)
        for block in self.blocks[:-1]:
            x = block(x, True)
        last = self.blocks[-1]
        return last.attn.probabilities(last.norm1(x))

    def spatial_map(self, x) -> jax.Array:
        """Where the model looks [B, gh, gw]: last-block CLS->patch attention summed over heads
        (the map the official ContrastiveCrop boxes)."""
        attention = self.last_self_attention(x)[:, :, 0, 1:].sum(axis=1)
        return attention.reshape(x.shape[0], x.shape[1] // self.patch_size, -1)


# ----------------------------------------------------------------------------
# ConvNet
# ----------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------
# Projector and multi-crop wrapper
# ----------------------------------------------------------------------------

class Projector(nnx.Module):
    """MLP head of the official ``MlpProjHead``.

    n_layers Linear layers (all with the same ``bias`` flag), each hidden layer
    followed by [BatchNorm] + activation; the last Linear is followed by a
    non-affine BatchNorm only when ``use_bn and last_bn``. Linear weights
    ~ N(0, 0.02) (torch trunc_normal_ with std .02 truncates at +-2 absolute,
    i.e. effectively never), biases 0. BatchNorm momentum/eps follow torch.
    """

    def __init__(self, in_dim: int, *, n_layers: int = 3, hidden_dim: int = 4096, out_dim: int = 4096,
                 act: str = 'gelu', use_bn: bool = True, last_bn: bool = True, bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if n_layers < 1:
            raise ValueError('projector needs at least one layer')
        if act not in ('gelu', 'relu'):
            raise ValueError(f'unknown projector activation {act!r}')
        self.act = act
        self.out_dim = out_dim
        linears, norms = [], []
        for i in range(n_layers):
            d_in = in_dim if i == 0 else hidden_dim
            d_out = out_dim if i == n_layers - 1 else hidden_dim
            linears.append(nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=nnx.initializers.normal(0.02),
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            is_last = i == n_layers - 1
            if use_bn and (not is_last or last_bn):
                norms.append(nnx.BatchNorm(d_out, momentum=0.9, epsilon=1e-5, use_bias=not is_last,
                                           use_scale=not is_last, dtype=dtype, param_dtype=param_dtype,
                                           rngs=rngs))
            else:
                norms.append(None)
        self.linears = nnx.List(linears)
        self.norms = nnx.List(norms)

    def __call__(self, x, *, deterministic: bool = True) -> jax.Array:
        """[N, in_dim] -> [N, out_dim] (float32). BatchNorm statistics are over all N rows."""
        n = len(self.linears)
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            x = linear(x)
            if norm is not None:
                x = norm(x, use_running_average=deterministic)
            if i < n - 1:
                x = jax.nn.gelu(x, approximate=False) if self.act == 'gelu' else jax.nn.relu(x)
        return x.astype(jnp.float32)


class BAMModel(nnx.Module):
    """Backbone + projector over multi-crop views.

    The backbone runs once per resolution group (all global crops folded into
    the batch, then all local crops); the projector runs once on every view so
    its BatchNorm statistics cover all views, as in the official
    MultiCropWrapper. Folding is batch-major ('(b v)'), so a batch sharded over
    devices stays sharded the same way.
    """

    def __init__(self, backbone: VisionTransformer | ConvNet, projector: Projector):
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
                             f'{type(self.backbone).__name__} backbone has not; use a ViT or '
                             f'ConvNet backbone or set --config.ccrop.enabled=False')
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
