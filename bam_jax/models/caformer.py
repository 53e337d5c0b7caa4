"""CAFormer (MetaFormer baselines, Yu et al. 2022) in flax.nnx, channels-last, as the official BAM
`models/metaformer.py` (itself timm's `metaformer.py`) builds it.

Four stages. A convolutional stem (kernel 7, stride 4, padding 2, then a bias-free LayerNorm)
opens stage 1; stages 2-4 open with a downsampling convolution (bias-free LayerNorm first,
then kernel 3, stride 2, padding 1). Stages 1-2 mix tokens with SepConv (1x1 expansion x2,
activation, 7x7 depthwise, 1x1 back; no biases), stages 3-4 with self-attention (head dim 32,
no biases by default); every block is `x = r*x + drop_path(mixer(norm1(x)))` then
`x = r*x + drop_path(mlp(norm2(x)))`, MLP ratio 4 without biases, every norm a LayerNorm
without bias (eps 1e-6) over the channels. The output is the global average pool followed by a
LayerNorm with bias. Everything is NHWC: a 1x1 convolution is a Dense over the channels, so the
conv stages and the attention stages share one layout and no transposes are needed.

Two variants:
  * `act="gelu", res_scale=False` (the default): what the official BAM builder trains
    (`utils.get_arch`: `mlp_act=act1_layer=nn.GELU`, `res_scale_init_values=(None,)*4`);
  * `act="starrelu", res_scale=True`: timm's original CAFormer (StarReLU `s*relu(x)**2+b` with a
    learnable scalar scale and bias, res-scales initialised to 1 in the attention stages), which
    timm's ImageNet-pretrained weights use.

Presets: `CAFORMER_PRESETS` (s18, s36, m36, b36). Parameter names follow timm's keys
(`stem.conv`, `stages[i].downsample.{norm,conv}`, `stages[i].blocks[j].{norm1,token_mixer,
res_scale1,norm2,mlp,res_scale2}`, `head_norm`), so `bam_jax.tools.convert` maps them one to one.
"""
from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bam_jax.models import vit

LN_EPS = 1e-6
HEAD_DIM = 32
MLP_RATIO = 4
SEPCONV_EXPANSION = 2
SEPCONV_KERNEL = 7

CAFORMER_PRESETS = {
    # name: (depths, dims)
    's18': ((3, 3, 9, 3), (64, 128, 320, 512)),
    's36': ((3, 12, 18, 3), (64, 128, 320, 512)),
    'm36': ((3, 12, 18, 3), (96, 192, 384, 576)),
    'b36': ((3, 12, 18, 3), (128, 256, 512, 768)),
}
# The token mixer of each stage (the CAFormer layout).
MIXERS = ('sepconv', 'sepconv', 'attention', 'attention')

# torch `trunc_normal_(std=.02)` (cut at +-2, i.e. 100 standard deviations: a normal) for every
# Conv2d / Linear weight, zero biases (MetaFormer._init_weights).
_KERNEL_INIT = nnx.initializers.normal(0.02)


def _norm(dim, *, bias: bool = False, dtype, param_dtype, rngs):
    return nnx.LayerNorm(dim, epsilon=LN_EPS, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)


def _dense(din, dout, *, bias: bool, dtype, param_dtype, rngs):
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=_KERNEL_INIT, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)


class StarReLU(nnx.Module):
    """timm's StarReLU: scale * relu(x)**2 + bias, scale and bias learnable scalars (1, 0)."""

    def __init__(self, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((1,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((1,), param_dtype))

    def __call__(self, x):
        relu = jax.nn.relu(x)
        return self.scale[...].astype(x.dtype) * relu * relu + self.bias[...].astype(x.dtype)


def _activation(act: str, *, param_dtype):
    if act == 'gelu':
        return None  # exact (erf) GELU, torch nn.GELU; no parameters
    if act == 'starrelu':
        return StarReLU(param_dtype=param_dtype)
    raise ValueError(f'unknown CAFormer activation {act!r} (gelu or starrelu)')


def _apply_act(module, x):
    return jax.nn.gelu(x, approximate=False) if module is None else module(x)


class Stem(nnx.Module):
    def __init__(self, cin, cout, *, dtype, param_dtype, rngs):
        self.conv = nnx.Conv(cin, cout, (7, 7), strides=(4, 4), padding=((2, 2), (2, 2)),
                             kernel_init=_KERNEL_INIT, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)
        self.norm = _norm(cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.conv(x))


class Downsampling(nnx.Module):
    def __init__(self, cin, cout, *, dtype, param_dtype, rngs):
        self.norm = _norm(cin, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                             kernel_init=_KERNEL_INIT, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)

    def __call__(self, x):
        return self.conv(self.norm(x))


class SepConv(nnx.Module):
    """MobileNetV2's inverted separable convolution on [B, H, W, C]: no biases."""

    def __init__(self, dim, *, act, dtype, param_dtype, rngs):
        mid = SEPCONV_EXPANSION * dim
        pad = SEPCONV_KERNEL // 2
        self.pwconv1 = _dense(dim, mid, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act1 = _activation(act, param_dtype=param_dtype)
        self.dwconv = nnx.Conv(mid, mid, (SEPCONV_KERNEL, SEPCONV_KERNEL),
                               padding=((pad, pad), (pad, pad)), feature_group_count=mid,
                               use_bias=False, kernel_init=_KERNEL_INIT, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.pwconv2 = _dense(mid, dim, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.pwconv2(self.dwconv(_apply_act(self.act1, self.pwconv1(x))))


class Attention(vit.Attention):
    """Self-attention on [B, N, C] with head dim 32 (max(1, C // 32) heads), no proj bias; the
    ViT's forward and attention probabilities."""

    def __init__(self, dim, *, qkv_bias, dtype, param_dtype, rngs):
        self.num_heads = max(dim // HEAD_DIM, 1)
        self.head_dim = HEAD_DIM
        inner = self.num_heads * HEAD_DIM
        self.qkv = _dense(dim, 3 * inner, bias=qkv_bias, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
        self.proj = _dense(inner, dim, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Mlp(nnx.Module):
    def __init__(self, dim, *, act, dtype, param_dtype, rngs):
        self.fc1 = _dense(dim, MLP_RATIO * dim, bias=False, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
        self.act = _activation(act, param_dtype=param_dtype)
        self.fc2 = _dense(MLP_RATIO * dim, dim, bias=False, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, x):
        return self.fc2(_apply_act(self.act, self.fc1(x)))


class ResScale(nnx.Module):
    def __init__(self, dim, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        return x * self.scale[...].astype(x.dtype)


def _drop_path(x, rate: float, deterministic: bool, key):
    """timm's DropPath: per sample, keep with 1 - rate and scale by 1 / (1 - rate)."""
    if deterministic or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Block(nnx.Module):
    """One MetaFormer block; [B, H, W, C] in the conv stages, [B, N, C] in the attention ones."""

    def __init__(self, dim, mixer: str, *, act, res_scale, qkv_bias, drop_path, dtype,
                 param_dtype, rngs):
        self.drop_path = drop_path
        self.norm1 = _norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if mixer == 'sepconv':
            self.token_mixer = SepConv(dim, act=act, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs)
        else:
            self.token_mixer = Attention(dim, qkv_bias=qkv_bias, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
        self.res_scale1 = ResScale(dim, param_dtype=param_dtype) if res_scale else None
        self.norm2 = _norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = Mlp(dim, act=act, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.res_scale2 = ResScale(dim, param_dtype=param_dtype) if res_scale else None

    def __call__(self, x, deterministic: bool = True, key=None):
        k1, k2 = (None, None) if key is None else tuple(jax.random.split(key))
        branch = _drop_path(self.token_mixer(self.norm1(x)), self.drop_path, deterministic, k1)
        x = (x if self.res_scale1 is None else self.res_scale1(x)) + branch
        branch = _drop_path(self.mlp(self.norm2(x)), self.drop_path, deterministic, k2)
        return (x if self.res_scale2 is None else self.res_scale2(x)) + branch


class Stage(nnx.Module):
    def __init__(self, cin, cout, depth, mixer, *, rates, act, res_scale, qkv_bias, dtype,
                 param_dtype, rngs):
        self.mixer = mixer
        # As timm: no downsampling when the width does not change (stage 1, after the stem).
        self.downsample = None if cin == cout else Downsampling(
            cin, cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([
            Block(cout, mixer, act=act, res_scale=res_scale, qkv_bias=qkv_bias,
                  drop_path=float(rate), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for rate in rates])


def _run_group(stage: Stage, x, deterministic: bool, start: int, end: int, keys):
    for i in range(start, end):
        x = stage.blocks[i](x, deterministic, None if keys is None else keys[i - start])
    return x


_run_group_remat = nnx.remat(_run_group, static_argnums=(2, 3, 4))


class CAFormer(nnx.Module):
    """CAFormer backbone: images [B, H, W, C] -> pooled, normed features [B, dims[-1]] (float32).

    `remat_every=k > 0` rematerialises the blocks of each stage in groups of k (the official
    `--grad_checkpointing k`: timm's `checkpoint_seq(blocks, every=k)` per stage).
    """

    def __init__(self, *, in_channels: int = 3, depths=(3, 12, 18, 3), dims=(96, 192, 384, 576),
                 act: str = 'gelu', res_scale: bool = False, qkv_bias: bool = False,
                 drop_path_rate: float = 0.0, remat_every: int = 0, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
        if len(depths) != len(MIXERS) or len(dims) != len(MIXERS):
            raise ValueError(f'CAFormer has {len(MIXERS)} stages: got depths {depths}, dims {dims}')
        self.depths, self.dims = depths, dims
        self.embed_dim = dims[-1]
        self.depth = sum(depths)
        self.remat_every = int(remat_every)
        self.dtype = dtype
        self.stem = Stem(in_channels, dims[0], dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # One stream for all blocks, drawn outside any remat (as the ViT).
        self.drop_path_rngs = rngs['dropout'].fork() if drop_path_rate > 0 else None
        rates = np.linspace(0.0, drop_path_rate, self.depth)
        bounds = np.cumsum((0,) + depths)
        self.stages = nnx.List([
            Stage(dims[max(i - 1, 0)], dims[i], depths[i], MIXERS[i],
                  rates=rates[bounds[i]:bounds[i + 1]], act=act,
                  res_scale=res_scale and MIXERS[i] == 'attention', qkv_bias=qkv_bias,
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for i in range(len(MIXERS))])
        self.head_norm = _norm(dims[-1], bias=True, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

    def _stage_input(self, stage: Stage, x):
        """Downsample, and flatten the grid to tokens for an attention stage."""
        if stage.downsample is not None:
            x = stage.downsample(x)
        grid = x.shape[1:3]
        if stage.mixer == 'attention':
            x = einops.rearrange(x, 'b h w c -> b (h w) c')
        return x, grid

    def _run_stage(self, stage: Stage, x, deterministic: bool, keys):
        x, grid = self._stage_input(stage, x)
        n, every = len(stage.blocks), self.remat_every
        for start in range(0, n, every if every > 0 else n):
            end = min(start + every, n) if every > 0 else n
            group_keys = None if keys is None else keys[start:end]
            if every > 0:
                x = _run_group_remat(stage, x, deterministic, start, end, group_keys)
            else:
                x = _run_group(stage, x, deterministic, start, end, group_keys)
        if stage.mixer == 'attention':
            x = einops.rearrange(x, 'b (h w) c -> b h w c', h=grid[0], w=grid[1])
        return x

    def forward_features(self, x, *, deterministic: bool = True):
        """The last stage's map [B, h, w, dims[-1]] (compute dtype)."""
        x = self.stem(x.astype(self.dtype))
        keys = None
        if not deterministic and self.drop_path_rngs is not None:
            keys = jax.random.split(self.drop_path_rngs(), self.depth)
        offset = 0
        for stage in self.stages:
            n = len(stage.blocks)
            x = self._run_stage(stage, x, deterministic,
                                None if keys is None else keys[offset:offset + n])
            offset += n
        return x

    def __call__(self, x, *, deterministic: bool = True) -> jax.Array:
        """Images [B,H,W,C] -> global average pool + LayerNorm [B, dims[-1]] (float32)."""
        pooled = self.forward_features(x, deterministic=deterministic).astype(jnp.float32)
        return self.head_norm(pooled.mean(axis=(1, 2))).astype(jnp.float32)

    def feature_dim(self, n_last_blocks: int = 1, avgpool: bool = False) -> int:
        del n_last_blocks, avgpool
        return self.embed_dim

    def features(self, x, *, n_last_blocks: int = 1, avgpool: bool = False) -> jax.Array:
        """Linear-eval features: the official eval_linear.py takes `model(inp)` for a CAFormer
        (pooled + normed), whatever `n_last_blocks` and `avgpool_patchtokens` say."""
        del n_last_blocks, avgpool
        return self(x, deterministic=True)

    @property
    def feature_stride(self) -> int:
        """Pixels per last-stage location: the stem's 4, then 2 per further stage (32)."""
        return 4 * 2 ** (len(self.stages) - 1)

    def patch_features(self, x) -> jax.Array:
        """Eval-mode last-stage map, each location normed by the head's LayerNorm, [B, h, w,
        dims[-1]] (float32): per-location features for video segmentation (the official script
        takes ViT patch tokens; this is the CAFormer's counterpart)."""
        return self.head_norm(self.forward_features(x).astype(jnp.float32)).astype(jnp.float32)

    def last_self_attention(self, x) -> jax.Array:
        """Attention probabilities of the last block of the last stage [B, heads, N, N]
        (N: that stage's tokens, row-major over its grid; queries on axis 2)."""
        x = self.stem(x.astype(self.dtype))
        for stage in self.stages[:-1]:
            x = self._run_stage(stage, x, True, None)
        last = self.stages[-1]
        x, _ = self._stage_input(last, x)
        for block in last.blocks[:-1]:
            x = block(x, True)
        block = last.blocks[-1]
        return block.token_mixer.probabilities(block.norm1(x))

    def last_stage_grid(self, height: int, width: int) -> tuple[int, int]:
        """The last stage's token grid for an image of this size (224 -> 7, 96 -> 3)."""
        def down(n, k, s, p):
            return (n + 2 * p - k) // s + 1
        h, w = down(height, 7, 4, 2), down(width, 7, 4, 2)
        for _ in range(len(self.stages) - 1):
            h, w = down(h, 3, 2, 1), down(w, 3, 2, 1)
        return h, w

    def received_attention(self, x) -> jax.Array:
        """Per head, the attention each last-stage token receives, averaged over the queries
        [B, heads, h, w]: the official `get_selfattention` (`attn.mean(dim=2)`), on the grid."""
        attention = self.last_self_attention(x).mean(axis=2)
        h, w = self.last_stage_grid(x.shape[1], x.shape[2])
        return attention.reshape(x.shape[0], attention.shape[1], h, w)

    def spatial_map(self, x) -> jax.Array:
        """Where the model looks [B, h, w], for ContrastiveCrop: `received_attention` summed over
        heads (the official box code sums heads; it never ran for a CAFormer, see README)."""
        return self.received_attention(x).sum(axis=1)
