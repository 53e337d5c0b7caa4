"""Models: shapes, frozen parts, drop path, remat, dtypes, pos-embed resampling, functional use."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bam_jax import models as M
from bam_jax.models import vit as vit_lib
from configs import common


def _model_config():
    """configs.common's model in float32, with the official projector BatchNorms."""
    cfg = common.model_config(dtype='float32')
    cfg.projector.update(use_bn=True, last_bn=True)
    return cfg


def _vit_config(**overrides):
    cfg = _model_config()
    cfg.vit_variant = 'custom'
    cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size = 32, 2, 4, 8
    cfg.projector.hidden_dim, cfg.projector.out_dim = 24, 16
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _vit(**kwargs):
    args = dict(image_size=32, patch_size=8, in_channels=3, width=32, depth=2, num_heads=4,
                drop_path_rate=0.5)
    args.update(kwargs)
    return M.VisionTransformer(**args, rngs=nnx.Rngs(0))


# XLA compiles dominate the run time on small CPUs: models are built once (in one jit) and
# shared, tests that mutate a model take an nnx.clone, and jitted functions are module-level.
@functools.lru_cache(maxsize=None)
def _shared_vit(**kwargs):
    return nnx.jit(lambda: _vit(**kwargs))()


@functools.lru_cache(maxsize=None)
def _shared_bam():
    return nnx.jit(lambda: M.build_model(_vit_config(drop_path_rate=0.2), num_channels=3, image_size=32,
                                         rngs=nnx.Rngs(params=0, dropout=1)))()


def _images(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


_apply = nnx.jit(lambda m, x: m(x))
_apply_train = nnx.jit(lambda m, x: m(x, deterministic=False))
_apply_bam = nnx.jit(lambda m, g, l: m(g, l))
_project_crops = nnx.jit(lambda m, crops: m.projector(m.backbone(crops)))


def _split_float(model):
    """graphdef, (Params + Frozen), rest (RNG counters etc.)."""
    return nnx.split(model, (nnx.Param, M.Frozen), ...)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _loss_and_grad(graphdef, float_state, rest, x, deterministic=True):
    """Gradient w.r.t. every float tensor, trainable or frozen.

    ``copy=True``: variables mutated inside (RNG counters, batch stats) must be created at the
    grad trace level, not be the jit-level objects passed in.
    """
    def loss(s):
        return jnp.sum(nnx.merge(graphdef, s, rest, copy=True)(x, deterministic=deterministic) ** 2)
    return jax.value_and_grad(loss)(float_state)


def test_vit_shapes():
    vit = _shared_vit(patch_size=4, in_channels=1, image_size=28, width=48, num_heads=3, depth=1)
    x = _images((2, 28, 28, 1))

    @nnx.jit
    def run(m, x, small):
        return m(x), m.last_self_attention(x), m(small)

    out, attn, out_small = run(vit, x, _images((3, 12, 12, 1)))  # 12x12 crop: resampled positions
    assert out.shape == (2, 48) and out.dtype == jnp.float32
    assert attn.shape == (2, 3, 50, 50)
    assert out_small.shape == (3, 48)


@pytest.mark.parametrize('variant', ['tiny', 'small', 'base', 'large'])
def test_vit_presets(variant):
    cfg = _model_config()
    cfg.vit_variant = variant
    model = nnx.eval_shape(lambda: M.build_model(cfg, num_channels=3, image_size=224, rngs=nnx.Rngs(0)))
    width, depth, heads = M.VIT_PRESETS[variant]
    vit = model.backbone
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (width, depth, heads)
    assert vit.pos_embed.shape == (1 + 14 * 14, width)
    assert model.projector.linears[0].kernel.shape == (width, cfg.projector.hidden_dim)


def test_features_and_attention():
    vit = _shared_vit()
    x = _images((2, 32, 32, 3))

    @nnx.jit
    def run(m, x):
        return (m(x), m.features(x), m.features(x, n_last_blocks=2),
                m.features(x, n_last_blocks=2, avgpool=True), m.last_self_attention(x))

    cls, f1, f2, f2avg, attn = map(np.asarray, run(vit, x))
    assert cls.shape == f1.shape == (2, 32)
    np.testing.assert_allclose(f1, cls, rtol=1e-6, atol=1e-6)
    assert f2.shape == (2, 64)
    assert f2avg.shape == (2, 96) == (2, vit.feature_dim(2, True))
    np.testing.assert_allclose(f2avg[:, 32:64], cls, rtol=1e-6, atol=1e-6)
    assert (attn >= 0).all()
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)


def test_sincos_table_layout():
    table = vit_lib.sincos_pos_embed(3, 3, 8)
    assert table.shape == (10, 8)
    np.testing.assert_array_equal(table[0], 0.0)
    omega = 1.0 / 10000.0 ** (np.arange(2) / 2)
    r, c = 2, 1  # token index 1 + r * 3 + c
    expected = np.concatenate([np.sin(r * omega), np.cos(r * omega), np.sin(c * omega), np.cos(c * omega)])
    np.testing.assert_allclose(table[1 + r * 3 + c], expected, rtol=1e-6)


def test_pos_embed_interpolation():
    vit = nnx.eval_shape(lambda: _vit(image_size=64, patch_size=8))  # native grid 8x8
    vit.pos_embed.set_value(jnp.asarray(vit_lib.sincos_pos_embed(8, 8, 32)))
    exact = vit_lib.sincos_pos_embed(8, 8, 32)
    np.testing.assert_array_equal(vit.interpolated_pos_embed(8, 8), exact)
    np.testing.assert_array_equal(vit_lib.bicubic_matrix(8, 8), np.eye(8, dtype=np.float32))
    for gh, gw in [(3, 3), (5, 7), (12, 12)]:
        out = vit.interpolated_pos_embed(gh, gw)
        assert out.shape == (1 + gh * gw, 32)
        np.testing.assert_array_equal(out[0], 0.0)  # CLS entry kept
    for n_in, n_out in [(8, 3), (14, 6), (4, 9)]:
        np.testing.assert_allclose(vit_lib.bicubic_matrix(n_in, n_out).sum(1), 1.0, rtol=1e-6)


@pytest.mark.xla_optimized  # against a reference at tight tolerances
def test_bicubic_matches_torch():
    torch = pytest.importorskip('torch')
    vit = nnx.eval_shape(lambda: _vit(image_size=112, patch_size=8, width=16, num_heads=2))  # grid 14x14
    vit.pos_embed.set_value(jnp.asarray(vit_lib.sincos_pos_embed(14, 14, 16)))
    grid = np.array(vit.pos_embed[...])[1:].reshape(14, 14, 16)
    for gh, gw in [(6, 6), (4, 9), (20, 17)]:
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(grid).permute(2, 0, 1)[None], size=(gh, gw), mode='bicubic',
            align_corners=False, antialias=True)[0].permute(1, 2, 0).reshape(gh * gw, 16).numpy()
        ours = np.asarray(vit.interpolated_pos_embed(gh, gw))[1:]
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_frozen_parts_get_no_update():
    vit = nnx.clone(_shared_vit())
    frozen_before = nnx.state(vit, M.Frozen)
    assert {str(p[-1]) for p, _ in frozen_before.flat_state()} == {'patch_kernel', 'patch_bias', 'pos_embed'}
    x = _images((4, 32, 32, 3))

    # Even a gradient w.r.t. the whole state is zero on the frozen tensors.
    graphdef, float_state, rest = _split_float(vit)
    _, grads = _loss_and_grad(graphdef, float_state, rest, x)
    frozen_grads = nnx.state(nnx.merge(graphdef, grads, rest), M.Frozen)
    for g in jax.tree.leaves(frozen_grads):
        np.testing.assert_array_equal(g, 0.0)
    assert np.abs(np.asarray(grads['cls_token'][...])).sum() > 0

    # The optimizer only sees Params: frozen values are unchanged after a step.
    opt = nnx.Optimizer(vit, optax.sgd(1.0), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        opt.update(m, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))

    step(vit, opt)
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(nnx.state(vit, M.Frozen))):
        np.testing.assert_array_equal(a, b)

    trainable = nnx.eval_shape(lambda: _vit(freeze_patch_embed=False))
    assert isinstance(trainable.patch_kernel, nnx.Param)
    assert {str(p[-1]) for p, _ in nnx.state(trainable, M.Frozen).flat_state()} == {'pos_embed'}


def test_drop_path():
    vit = nnx.clone(_shared_vit())
    x = _images((4, 32, 32, 3))
    np.testing.assert_array_equal(_apply(vit, x), _apply(vit, x))
    a, b = _apply_train(vit, x), _apply_train(vit, x)
    assert not np.allclose(a, b)
    # The mask is per sample: every token/channel of a sample is kept (scaled) or dropped together.
    block = vit.blocks[-1]
    out = np.asarray(block.drop_path1(jnp.ones((64, 5, 8)), deterministic=False, rngs=jax.random.key(0)))
    per_sample = out.reshape(64, -1)
    assert (per_sample == per_sample[:, :1]).all()
    assert set(np.unique(per_sample)) == {0.0, 1.0 / (1 - block.drop_path1.rate)}
    assert vit.blocks[0].drop_path1.rate == 0.0  # linear schedule starts at 0


@pytest.mark.xla_optimized  # gradients of ~1e-5 compared at atol 1e-6
def test_remat_same_outputs_and_grads():
    """In training mode: same RNG state -> same drop-path masks with and without remat."""
    x = _images((4, 32, 32, 3))
    outs, grads = [], []
    for remat in (False, True):
        loss, grad = _loss_and_grad(*_split_float(_shared_vit(remat=remat)), x, False)
        outs.append(loss)
        grads.append(grad)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)
    for g0, g1 in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(g0, g1, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute():
    x = _images((4, 32, 32, 3))
    f32 = _shared_vit()
    bf16 = _shared_vit(dtype=jnp.bfloat16)  # same seed: same params
    assert bf16.blocks[0].attn.qkv.kernel.dtype == jnp.float32  # params stay float32

    @nnx.jit
    def run(m, x):
        return m(x), m.blocks[0].mlp.fc1(m._embed(x))

    out, hidden = run(bf16, x)
    assert hidden.dtype == jnp.bfloat16
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, _apply(f32, x), atol=0.1)
    cfg = _vit_config(dtype='bfloat16', backbone='convnet')
    model = nnx.eval_shape(lambda: M.build_model(cfg, num_channels=1, image_size=28, rngs=nnx.Rngs(0)))
    assert model.backbone.convs[0].dtype == model.projector.linears[0].dtype == jnp.bfloat16
    assert model.backbone.convs[0].kernel.dtype == jnp.float32


def test_convnet():
    net = nnx.jit(lambda: M.ConvNet(in_channels=1, channels=(8, 16, 32), strides=(1, 2, 2), rngs=nnx.Rngs(0)))()
    x = _images((4, 28, 28, 1))
    out_eval, feats, out_train = nnx.jit(
        lambda m, x: (m(x), m.features(x, n_last_blocks=4, avgpool=True), m(x, deterministic=False)))(net, x)
    assert out_eval.shape == out_train.shape == (4, 32)
    assert feats.shape == (4, 32) == (4, net.feature_dim(4, True))
    np.testing.assert_allclose(feats, out_eval, rtol=1e-6)


class _CountingConvNet(M.ConvNet):
    calls = []

    def __call__(self, x, *, deterministic=True):
        type(self).calls.append(x.shape)
        return super().__call__(x, deterministic=deterministic)


def test_bam_model_multicrop():
    model = nnx.jit(lambda: M.BAMModel(
        _CountingConvNet(in_channels=3, channels=(8, 16), strides=(1, 2), norm='group', rngs=nnx.Rngs(0)),
        M.Projector(16, n_layers=3, hidden_dim=12, out_dim=10, rngs=nnx.Rngs(1))))()
    g = _images((3, 2, 32, 32, 3), 1)
    l = _images((3, 4, 16, 16, 3), 2)
    _CountingConvNet.calls.clear()

    @nnx.jit
    def run(m, g, l):
        return m(g, l), m(g, None), m.embed(g[:, 0]), m.backbone(g[:, 0], deterministic=True)

    z, z_global, embed, direct = map(np.asarray, run(model, g, l))
    assert z.shape == (3, 6, 10)
    # once per resolution group, then once more for the global-only call (and embed/direct)
    assert _CountingConvNet.calls[:3] == [(6, 32, 32, 3), (12, 16, 16, 3), (6, 32, 32, 3)]
    assert z_global.shape == (3, 2, 10)
    # View order is globals then locals; in eval mode each view equals a per-crop call.
    np.testing.assert_allclose(z[:, :2], z_global, rtol=1e-5, atol=1e-5)
    for b in range(3):
        np.testing.assert_allclose(z[b, 2:], _project_crops(model, l[b]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embed, direct, rtol=1e-6)


def test_vit_bam_model_multicrop_matches_per_crop():
    model = _shared_bam()
    g = _images((4, 2, 32, 32, 3), 1)
    l = _images((4, 2, 16, 16, 3), 2)
    z = np.asarray(_apply_bam(model, g, l))
    assert z.shape == (4, 4, 16)
    np.testing.assert_allclose(z[1, 2:], _project_crops(model, l[1]), rtol=1e-4, atol=1e-5)


def test_projector_structure():
    proj = M.Projector(8, n_layers=3, hidden_dim=64, out_dim=4, act='relu', use_bn=True, last_bn=True,
                       bias=False, rngs=nnx.Rngs(0))
    assert all(lin.bias is None for lin in proj.linears)
    assert proj.norms[0].scale is not None and proj.norms[1].scale is not None
    assert proj.norms[2].scale is None and proj.norms[2].bias is None  # non-affine output BN
    z = np.asarray(_apply_train(proj, _images((32, 8))))
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.var(0), 1.0, rtol=0.05)  # var / (var + eps) with tiny pre-BN variance
    no_last = nnx.eval_shape(lambda: M.Projector(8, n_layers=2, hidden_dim=6, out_dim=4, last_bn=False,
                                                 rngs=nnx.Rngs(0)))
    assert no_last.norms[1] is None and no_last.linears[1].bias is not None
    no_bn = nnx.eval_shape(lambda: M.Projector(8, n_layers=2, hidden_dim=6, out_dim=4, use_bn=False,
                                               last_bn=True, rngs=nnx.Rngs(0)))
    assert list(no_bn.norms) == [None, None]
    one = nnx.jit(lambda: M.Projector(8, n_layers=1, out_dim=4, rngs=nnx.Rngs(0)))()
    assert len(one.linears) == 1 and one.norms[0].scale is None
    assert _apply_train(one, _images((5, 8))).shape == (5, 4)


def test_functional_split_jit_merge_roundtrip():
    model = nnx.clone(_shared_bam())
    g = _images((4, 2, 32, 32, 3), 1)
    l = _images((4, 2, 16, 16, 3), 2)
    graphdef, state = nnx.split(model)

    @jax.jit
    def train_forward(state):
        m = nnx.merge(graphdef, state)
        z = m(g, l, deterministic=False)
        return z, nnx.state(m)

    @jax.jit
    def eval_forward(state):
        return nnx.merge(graphdef, state)(g, l, deterministic=True)

    z1, state1 = train_forward(state)
    z2, state2 = train_forward(state1)
    assert z1.shape == (4, 4, 16)
    assert not np.allclose(z1, z2)  # RNG counters advanced through the returned state
    bn_before = nnx.state(nnx.merge(graphdef, state), nnx.BatchStat)
    bn_after = nnx.state(nnx.merge(graphdef, state1), nnx.BatchStat)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(bn_before), jax.tree.leaves(bn_after)))
    np.testing.assert_allclose(eval_forward(state1), _apply_bam(nnx.merge(graphdef, state1), g, l),
                               rtol=1e-5, atol=1e-5)
    # same state in -> same output out (pure function of the state)
    np.testing.assert_array_equal(train_forward(state)[0], z1)


def test_pixels_backbone_is_the_flattened_image():
    cfg = _model_config()
    cfg.backbone = 'pixels'
    cfg.projector.update(hidden_dim=16, out_dim=8)
    model = M.build_model(cfg, num_channels=1, image_size=28, rngs=nnx.Rngs(0))
    x = _images((3, 28, 28, 1))
    np.testing.assert_array_equal(model.embed(x), x.reshape(3, -1))
    assert model(x[:, None], deterministic=True).shape == (3, 1, 8)
    assert not jax.tree.leaves(nnx.state(model.backbone, nnx.Param))
