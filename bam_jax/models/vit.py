"""Vision Transformer backbone (the official MoCo-v3-style ViT, flax.nnx).

Frozen tensors (the fixed sin-cos position embedding and, as in the official ViT, the randomly
initialised patch projection) are :class:`Frozen` variables, not ``nnx.Param``: an optimizer built
with ``wrt=nnx.Param`` never sees them, and they are read through ``jax.lax.stop_gradient`` so even a
gradient w.r.t. the whole state is exactly zero for them.
"""
from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
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


class Frozen(nnx.Variable):
    """A non-trainable tensor: not an ``nnx.Param``, so optimizers skip it."""


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
        """q, k, v [B, heads, N, head_dim]: heads-major, the layout of both batched matmuls,
        made by one einsum with the qkv kernel seen as [C, 3, heads, head_dim], so that XLA:CPU
        copies nothing around them: ~15 % less CPU time on ViT-S/16's forward + backward than
        the Linear's [B, N, 3C] rearranged for `jax.nn.dot_product_attention`."""
        linear = self.qkv
        bias = linear.bias[...] if linear.bias is not None else None
        x, kernel, bias = linear.promote_dtype((x, linear.kernel[...], bias), dtype=linear.dtype)
        kernel = kernel.reshape(kernel.shape[0], 3, self.num_heads, -1)
        qkv = jnp.einsum('bnc,cthd->tbhnd', x, kernel, precision=linear.precision)
        if bias is not None:
            qkv = qkv + bias.reshape(3, 1, self.num_heads, 1, -1)
        return qkv[0], qkv[1], qkv[2]

    def __call__(self, x):
        # As jax.nn.dot_product_attention: float32 logits and softmax, probabilities cast back.
        q, k, v = self._qkv(x)
        logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * (1.0 / math.sqrt(self.head_dim)), axis=-1)
        out = jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v.dtype), v)
        return self.proj(einops.rearrange(out, 'b h n d -> b n (h d)'))

    def probabilities(self, x):
        """Softmax attention matrix [B, heads, N, N] in float32."""
        q, k, _ = self._qkv(x)
        logits = jnp.einsum('bhqd,bhkd->bhqk', q.astype(jnp.float32), k.astype(jnp.float32))
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

    @property
    def feature_stride(self) -> int:
        return self.patch_size

    def patch_features(self, x) -> jax.Array:
        """Eval-mode patch tokens of the last block after the final norm [B, gh, gw, width]
        (the official video segmentation's `get_intermediate_layers(n=1, norm=True)`)."""
        (tokens,) = self._forward(x, True, 1)
        patches = self.norm(tokens)[:, 1:].astype(jnp.float32)
        return patches.reshape(x.shape[0], x.shape[1] // self.patch_size, -1, self.embed_dim)

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
