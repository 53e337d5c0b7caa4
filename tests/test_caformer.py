"""CAFormer: features against a PyTorch CAFormer laid out with timm's key names (the official BAM
builder's GELU variant and timm's StarReLU / res-scale original), the official
caformer_m36.slurm flags against configs/caformer_m36.py, weight conversion both ways, and a tiny
CAFormer BAM run through the trainer (start, resume, kNN, linear probe, pictures, export).

Kept fast: tiny widths and depths, one set of compiled programs per shape.
"""

import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
nn = torch.nn
F = torch.nn.functional

from flax import nnx  # noqa: E402

from bam_jax import contrastive_crop, models  # noqa: E402
from bam_jax.tools import convert  # noqa: E402

DEPTHS, DIMS = (1, 1, 2, 1), (16, 24, 64, 72)  # 2 heads in the attention stages; 72 != 2 x 32


# ---------------------------------------------------------------------------------------------
# A PyTorch CAFormer as timm / the official models/metaformer.py build it (NCHW, timm names).
# ---------------------------------------------------------------------------------------------
class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm LayerNorm2d[NoBias]), eps 1e-6."""

    def __init__(self, channels, bias=False):
        super().__init__(channels, eps=1e-6, bias=bias)

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


class _StarReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.scale * F.relu(x) ** 2 + self.bias


def _act(kind):
    return nn.GELU() if kind == "gelu" else _StarReLU()


class _Stem(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=7, stride=4, padding=2)
        self.norm = _LayerNorm2d(cout)

    def forward(self, x):
        return self.norm(self.conv(x))


class _Downsampling(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = _LayerNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(self.norm(x))


class _SepConv(nn.Module):
    def __init__(self, dim, act):
        super().__init__()
        mid = 2 * dim
        self.pwconv1 = nn.Conv2d(dim, mid, 1, bias=False)
        self.act1 = _act(act)
        self.dwconv = nn.Conv2d(mid, mid, 7, padding=3, groups=mid, bias=False)
        self.pwconv2 = nn.Conv2d(mid, dim, 1, bias=False)

    def forward(self, x):
        return self.pwconv2(self.dwconv(self.act1(self.pwconv1(x))))


class _Attention(nn.Module):
    def __init__(self, dim, qkv_bias):
        super().__init__()
        self.heads = max(dim // 32, 1)
        self.qkv = nn.Linear(dim, 3 * self.heads * 32, bias=qkv_bias)
        self.proj = nn.Linear(self.heads * 32, dim, bias=False)

    def _qkv(self, x):
        b, n, _ = x.shape
        return self.qkv(x).reshape(b, n, 3, self.heads, 32).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x):
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def attention(self, x):  # the official `return_attention=True` branch
        q, k, _ = self._qkv(x)
        return ((q * 32 ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)


class _Mlp(nn.Module):
    def __init__(self, dim, act, conv):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1, bias=False)) if conv else \
            (lambda i, o: nn.Linear(i, o, bias=False))
        self.fc1 = layer(dim, 4 * dim)
        self.act = _act(act)
        self.fc2 = layer(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Scale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.scale


class _Block(nn.Module):
    def __init__(self, dim, attention, act, res_scale, qkv_bias):
        super().__init__()
        norm = (lambda: nn.LayerNorm(dim, eps=1e-6, bias=False)) if attention else \
            (lambda: _LayerNorm2d(dim))
        self.norm1 = norm()
        self.token_mixer = _Attention(dim, qkv_bias) if attention else _SepConv(dim, act)
        self.res_scale1 = _Scale(dim) if res_scale else nn.Identity()
        self.norm2 = norm()
        self.mlp = _Mlp(dim, act, conv=not attention)
        self.res_scale2 = _Scale(dim) if res_scale else nn.Identity()

    def forward(self, x):
        x = self.res_scale1(x) + self.token_mixer(self.norm1(x))
        return self.res_scale2(x) + self.mlp(self.norm2(x))


class _Stage(nn.Module):
    def __init__(self, cin, cout, depth, attention, act, res_scale, qkv_bias):
        super().__init__()
        self.attention = attention
        self.downsample = nn.Identity() if cin == cout else _Downsampling(cin, cout)
        self.blocks = nn.Sequential(*[_Block(cout, attention, act, res_scale and attention,
                                             qkv_bias) for _ in range(depth)])

    def _tokens(self, x):
        x = self.downsample(x)
        return x.flatten(2).transpose(1, 2) if self.attention else x, x.shape

    def forward(self, x):
        x, (b, c, h, w) = self._tokens(x)
        x = self.blocks(x)
        return x.transpose(1, 2).reshape(b, c, h, w) if self.attention else x


class _Head(nn.Module):
    def __init__(self, dim, num_classes):
        super().__init__()
        self.norm = _LayerNorm2d(dim, bias=True)
        self.fc = nn.Linear(dim, num_classes) if num_classes else nn.Identity()


class TorchCAFormer(nn.Module):
    def __init__(self, depths=DEPTHS, dims=DIMS, act="gelu", res_scale=False, qkv_bias=False,
                 num_classes=0, in_chans=3):
        super().__init__()
        self.stem = _Stem(in_chans, dims[0])
        self.stages = nn.Sequential(*[
            _Stage(dims[max(i - 1, 0)], dims[i], depths[i], i >= 2, act, res_scale, qkv_bias)
            for i in range(4)])
        self.head = _Head(dims[-1], num_classes)
        with torch.no_grad():  # every tensor random, so a swapped or missed mapping shows
            for name, p in self.named_parameters():
                if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", ".scale")):
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p) / max(p[0].numel(), 1) ** 0.5
                            if p.ndim > 1 else 0.1 * torch.randn_like(p))

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head.norm(x.mean((2, 3), keepdim=True)).flatten(1)

    def last_attention(self, x):
        x = self.stem(x)
        for stage in self.stages[:-1]:
            x = stage(x)
        last = self.stages[-1]
        x, _ = last._tokens(x)
        for block in last.blocks[:-1]:
            x = block(x)
        block = last.blocks[-1]
        return block.token_mixer.attention(block.norm1(x))


VARIANTS = {
    # the official BAM builder: GELU, no res-scales, no qkv bias
    "bam": dict(act="gelu", res_scale=False, qkv_bias=False),
    # timm's original (its ImageNet weights): StarReLU, res-scales; qkv bias to map one too
    "timm": dict(act="starrelu", res_scale=True, qkv_bias=True, num_classes=5),
}


@pytest.fixture(scope="module")
def torch_nets():
    torch.manual_seed(0)
    return {name: TorchCAFormer(**kwargs).eval() for name, kwargs in VARIANTS.items()}


@pytest.fixture(scope="module")
def checkpoints(torch_nets, tmp_path_factory):
    """The bam net as an official BAM checkpoint (DDP + StudentTeacherWrapper + MultiCropWrapper
    prefixes, a projector beside it, a different student), the timm net as a bare state dict."""
    root = tmp_path_factory.mktemp("caformer_ckpt")
    state = {}
    for key, value in torch_nets["bam"].state_dict().items():
        state[f"module.teacher.backbone.{key}"] = value
        state[f"module.student.backbone.{key}"] = value + 1.0
    state["module.teacher.proj_head.mlp.0.weight"] = torch.zeros(4, DIMS[-1])
    paths = {"bam": str(root / "bam.pth"), "timm": str(root / "timm.pth")}
    torch.save({"model": state, "epoch": 3}, paths["bam"])
    torch.save(torch_nets["timm"].state_dict(), paths["timm"])
    return paths


@pytest.fixture(scope="module")
def jax_nets(checkpoints):
    return {name: convert.load_torch_caformer(path) for name, path in checkpoints.items()}


def _images(size, channels=3, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, channels)).astype(
        np.float32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("size", [224, 96])
def test_features_match_torch(torch_nets, jax_nets, variant, size):
    images = _images(size)
    with torch.no_grad():
        expected = torch_nets[variant](torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    ours = np.asarray(jax.jit(lambda x: jax_nets[variant](x))(images))
    assert ours.shape == (2, DIMS[-1])
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


def test_patch_features_are_the_head_normed_last_stage_map(torch_nets, jax_nets):
    """Video segmentation's per-location features: each location of the last stage's map
    through the head's LayerNorm, on the stride-32 grid."""
    images = _images(96)[:, :, :64]  # 96 x 64 pixels -> 3 x 2 locations
    net = torch_nets["bam"]
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        x = net.stages(net.stem(x))
        expected = net.head.norm(x).permute(0, 2, 3, 1).numpy()
    ours = np.asarray(jax.jit(lambda x: jax_nets["bam"].patch_features(x))(images))
    assert ours.shape == (2, 3, 2, DIMS[-1]) and jax_nets["bam"].feature_stride == 32
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


def test_bfloat16_compute_stays_close(checkpoints):
    """bf16 compute (the recipe's), float32 parameters and output: close to float32."""
    model = convert.load_torch_caformer(checkpoints["bam"])
    graphdef, state = nnx.split(model)
    bf16 = nnx.merge(nnx.graphdef(models.CAFormer(depths=DEPTHS, dims=DIMS, dtype=jnp.bfloat16,
                                                  rngs=nnx.Rngs(0))), state)
    images = _images(96)
    out = bf16(images)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(images)), atol=0.1, rtol=0.05)


def test_attention_of_the_last_block_matches_torch_on_the_3x3_grid(torch_nets, jax_nets):
    """At 96 px the stage grids are 24 -> 12 -> 6 -> 3: 9 tokens attend in the last stage."""
    model = jax_nets["bam"]
    images = _images(96)
    with torch.no_grad():
        expected = torch_nets["bam"].last_attention(
            torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    ours = np.asarray(model.last_self_attention(images))
    assert ours.shape == (2, 2, 9, 9)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert model.last_stage_grid(96, 96) == (3, 3) and model.last_stage_grid(224, 224) == (7, 7)
    # ContrastiveCrop's map: the attention each token receives (mean over queries, the official
    # get_selfattention), summed over heads, on the grid.
    spatial = np.asarray(model.spatial_map(images))
    np.testing.assert_allclose(spatial, expected.mean(2).sum(1).reshape(2, 3, 3), atol=1e-5)
    boxes = np.asarray(contrastive_crop.boxes_from_maps(jnp.asarray(spatial), (96, 96), 0.1))
    assert boxes.shape == (2, 4) and (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()


def test_checkpoint_roles_and_unused_keys(checkpoints, torch_nets, caplog):
    import logging

    student = convert.load_torch_caformer(checkpoints["bam"], checkpoint_key="student")
    expected = torch_nets["bam"].state_dict()["stem.conv.bias"].numpy() + 1.0
    np.testing.assert_allclose(np.asarray(student.stem.conv.bias.get_value()), expected)
    with caplog.at_level(logging.WARNING):
        convert.load_torch_caformer(checkpoints["timm"])
    assert "head.* (2)" in caplog.text  # timm's classifier, left out and reported


def test_missing_and_unsupported_keys_are_one_line(torch_nets):
    state = {k: v.numpy() for k, v in torch_nets["bam"].state_dict().items()}
    broken = dict(state)
    del broken["stages.2.blocks.1.mlp.fc2.weight"]
    with pytest.raises(ValueError, match="lacks 1 required CAFormer key"):
        convert.caformer_from_timm(broken)
    extra = dict(state, **{"stages.0.blocks.0.layer_scale1.scale": np.ones(DIMS[0], np.float32)})
    with pytest.raises(ValueError, match="cannot represent: stages.0.blocks.0.layer_scale1"):
        convert.caformer_from_timm(extra)


def test_safetensors_round_trip_and_cli(checkpoints, torch_nets, jax_nets, tmp_path, capsys):
    """torch checkpoint -CLI-> safetensors (timm names) -> ours -> safetensors: identical."""
    out = tmp_path / "timm.safetensors"
    assert convert.main(["--arch=caformer", f"--torch_checkpoint={checkpoints['timm']}",
                         f"--output={out}"]) == 0
    assert "CAFormer depths (1, 1, 2, 1)" in capsys.readouterr().out
    exported = safetensors_numpy.load_file(str(out))
    reference = {k: v.numpy() for k, v in torch_nets["timm"].state_dict().items()
                 if not k.startswith("head.fc.")}
    assert sorted(exported) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    again = convert.load_backbone_safetensors(str(out))
    assert convert.caformer_to_timm(again).keys() == exported.keys()
    for key, value in convert.caformer_to_timm(again).items():
        np.testing.assert_array_equal(value, exported[key], err_msg=key)
    # A file without our metadata (timm's own save) is recognised by its names.
    from safetensors.numpy import save_file
    bare = tmp_path / "bare.safetensors"
    save_file(reference, str(bare))
    assert isinstance(convert.load_backbone_safetensors(str(bare)), models.CAFormer)


# ---------------------------------------------------------------------------------------------
# The official script's flags -> configs/caformer_m36.py.
# ---------------------------------------------------------------------------------------------
# Every flag of scripts/pretrain/caformer_m36.slurm (official BAM repository), as written there.
OFFICIAL_FLAGS = {
    "grad_checkpointing": "4", "wandb": "true", "seed": "1", "teacher": "true",
    "num_workers": "10", "arch": "caformer_m36", "epochs": "400", "warmup_epochs": "40",
    "batch_size_per_gpu": "256", "loc_interval": "40", "knn_freq": "16", "n_layers": "3",
    "hidden_dim": "4096", "out_dim": "4096", "proj_use_bn": "false", "proj_last_bn": "false",
    "proj_act": "gelu", "proj_bias": "true", "optimizer": "adamw", "drop_path_rate": "0.",
    "qkv_bias": "true", "reg": "0.05", "reg_final": "0.05", "temperature": "0.1",
    "num_sink_iter": "3", "lr": "0.0003", "min_lr": "1e-3", "clip_grad": "0.3",
    "weight_decay": "0.04", "weight_decay_end": "0.4", "target_crops_number": "2",
    "global_crops_number": "2", "global_crops_scale": "0.25 1.", "local_crops_number": "6",
    "local_crops_scale": "0.05 0.25", "use_fp16": "true", "top_k_sink": "128",
    "data_path": "/your_imagenet_path/train", "output_dir": "/your_output_dir_path/",
}
GPUS = 16  # --ntasks=16 (2 nodes x 8 GPUs)


def _where(config, flag, value):
    """The config's counterpart of one official flag: (what we have, what the flag means)."""
    m, ccrop = config.model, config.ccrop
    table = {
        # remat in groups of 4 blocks per stage
        "grad_checkpointing": lambda: (m.caformer.remat_every, int(value)),
        "seed": lambda: (config.seed, int(value)),
        "teacher": lambda: (config.teacher.enabled, value == "true"),
        "arch": lambda: ((m.backbone, m.caformer.variant), ("caformer", "m36")),
        "epochs": lambda: (config.num_epochs, int(value)),
        "warmup_epochs": lambda: (config.optimizer.warmup_epochs, int(value)),
        "batch_size_per_gpu": lambda: (config.batch_size, int(value) * GPUS),
        "loc_interval": lambda: ((ccrop.enabled, ccrop.loc_interval), (True, int(value))),
        "knn_freq": lambda: (config.knn.every_epochs, int(value)),
        "n_layers": lambda: (m.projector.n_layers, int(value)),
        "hidden_dim": lambda: (m.projector.hidden_dim, int(value)),
        "out_dim": lambda: (m.projector.out_dim, int(value)),
        "proj_use_bn": lambda: (m.projector.use_bn, value == "true"),
        "proj_last_bn": lambda: (m.projector.last_bn, value == "true"),
        "proj_act": lambda: (m.projector.act, value),
        "proj_bias": lambda: (m.projector.bias, value == "true"),
        "optimizer": lambda: (config.optimizer.name, value),
        # utils.get_arch passes neither --drop_path_rate nor --qkv_bias to a CAFormer: the
        # metaformer defaults hold (drop path 0, which the flag also says; no qkv bias).
        "drop_path_rate": lambda: (m.drop_path_rate, float(value)),
        "qkv_bias": lambda: (m.caformer.qkv_bias, False),
        "reg": lambda: (config.loss.sinkhorn_reg, float(value)),
        "reg_final": lambda: (config.loss.sinkhorn_reg_final, float(value)),
        "temperature": lambda: (config.loss.temperature, float(value)),
        "num_sink_iter": lambda: (config.loss.sinkhorn_iters, int(value)),
        "lr": lambda: (config.optimizer.base_lr, float(value)),
        "min_lr": lambda: (config.optimizer.min_lr, float(value)),
        "clip_grad": lambda: (config.optimizer.clip_grad, float(value)),
        "weight_decay": lambda: (config.optimizer.weight_decay, float(value)),
        "weight_decay_end": lambda: (config.optimizer.weight_decay_final, float(value)),
        "target_crops_number": lambda: (config.loss.num_target_crops, int(value)),
        "global_crops_number": lambda: (config.data.global_crops_number, int(value)),
        "global_crops_scale": lambda: (tuple(config.data.global_crops_scale),
                               tuple(float(v) for v in value.split())),
        "local_crops_number": lambda: (config.data.local_crops_number, int(value)),
        "local_crops_scale": lambda: (tuple(config.data.local_crops_scale),
                              tuple(float(v) for v in value.split())),
        "use_fp16": lambda: (m.dtype, "bfloat16"),  # fp16 autocast -> bf16 compute (README)
        "top_k_sink": lambda: (config.loss.top_k, int(value)),
        "data_path": lambda: (config.data.tfds_name, "imagenet2012"),  # ImageNet train, via tfds
    }
    # Logging and infrastructure: no counterpart that changes the run.
    if flag in ("wandb", "num_workers", "output_dir"):
        return None
    return table[flag]()


def test_every_official_flag_maps_to_the_config():
    from configs import caformer_m36

    config = caformer_m36.get_config()
    for flag, value in OFFICIAL_FLAGS.items():
        pair = _where(config, flag, value)
        if pair is not None:
            assert pair[0] == pair[1], f"--{flag} {value}: config has {pair[0]!r}"
    # main_pretrain.py defaults the script leaves alone: --use_ccrop true, --box_thresh 0.1,
    # --ccrop_alpha 0.6, the ContrastiveCrop image 224.
    assert (config.ccrop.box_thresh, config.ccrop.alpha, config.ccrop.image_size) == (0.1, 0.6, 0)
    assert config.data.global_crop_size == 224 and config.data.local_crop_size == 96


def test_official_script_has_exactly_these_flags():
    """When the official repository is mirrored here, its script still says exactly this."""
    mirror = "/work/.mirror/DanielShalam+BAM/repo"
    if not os.path.isdir(mirror):
        pytest.skip("the official repository is not mirrored on this machine")
    text = subprocess.run(["git", "-C", mirror, "show", "HEAD:scripts/pretrain/caformer_m36.slurm"],
                          capture_output=True, text=True, check=True).stdout
    command = text[text.index("main_pretrain.py"):].replace("\\\n", " ").split('"')[0]
    flags, name = {}, None
    for token in command.split()[1:]:
        if token.startswith("--"):
            name = token[2:]
            flags[name] = ""
        else:
            flags[name] = f"{flags[name]} {token}".strip()
    assert flags == OFFICIAL_FLAGS


def test_config_checks_name_bad_caformer_fields():
    from bam_jax import config_checks
    from configs import caformer_m36

    for field, value, expected in (
            ("variant", "m37", "config.model.caformer.variant='m37': must be one of"),
            ("act", "relu", "config.model.caformer.act='relu': must be one of 'gelu'"),
            ("remat_every", -1, "config.model.caformer.remat_every=-1: must be >= 0")):
        config = caformer_m36.get_config()
        config.model.caformer[field] = value
        with pytest.raises(ValueError, match=expected):
            config_checks.check_pretrain_config(config)
    config = caformer_m36.get_config()
    config.model.caformer.update(variant="custom", depths=(1, 1, 2))
    with pytest.raises(ValueError, match=r"config.model.caformer.depths=\(1, 1, 2\): must be 4"):
        config_checks.check_pretrain_config(config)
    config_checks.check_pretrain_config(caformer_m36.get_config())


# ---------------------------------------------------------------------------------------------
# A tiny CAFormer BAM run through the trainer, then everything downstream.
# ---------------------------------------------------------------------------------------------
def _tiny_caformer_config(steps=4):
    """configs/caformer_m36.py shrunk to seconds on the bundled digits (28 px, 12 px locals)."""
    from configs import caformer_m36
    from configs import default as default_config

    config = caformer_m36.get_config()
    config.data = default_config.get_config().data
    config.data.local_crops_number = 2
    config.batch_size = 16
    config.num_train_steps = steps
    config.model.caformer.update(variant="custom", depths=(1, 1, 2, 1), dims=(8, 16, 32, 40),
                                 remat_every=1)
    config.model.projector.update(hidden_dim=32, out_dim=16)
    config.model.dtype = "float32"  # resumes compare weights closely (bf16: features test)
    config.loss.top_k = 8
    config.optimizer.warmup_epochs = 0
    config.ccrop.enabled = False  # no box update in 4 steps; the box map is tested above
    config.knn.update(enabled=True, every_epochs=0, train_fraction=0.05, batch_size=256)
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.async_checkpointing = False
    config.mesh.num_devices = 2
    return config


@pytest.fixture(scope="module")
def caformer_run(tmp_path_factory):
    from bam_jax import train

    workdir = str(tmp_path_factory.mktemp("caformer_run"))
    final = train.train_and_evaluate(_tiny_caformer_config(), workdir)
    return workdir, final


def test_tiny_run_trains_and_evaluates(caformer_run):
    _, final = caformer_run
    assert final["step"] == 4
    assert np.isfinite(final["loss"])
    assert 0.0 <= final["knn_top1"] <= 100.0 and "teacher_knn_top1" in final


def test_tiny_run_resumes_with_another_remat(caformer_run, tmp_path):
    """Killed after step 2, resumed without remat (a field free on resume; the run had every
    block rematerialised, drop path off): the same step-4 weights, so remat changes nothing but
    memory."""
    from bam_jax import checkpoint, train

    source, _ = caformer_run
    workdir = str(tmp_path / "resumed")
    shutil.copytree(source, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    config = _tiny_caformer_config()
    config.model.caformer.remat_every = 0
    config.knn.enabled = False
    assert train.train_and_evaluate(config, workdir)["step"] == 4
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    (_, ours, _), (_, theirs, _) = (checkpoint.read_newest(w, sharding) for w in (workdir, source))
    for a, b in zip(jax.tree.leaves(ours["params"]), jax.tree.leaves(theirs["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_export_and_linear_probe_and_pictures(caformer_run, tmp_path):
    """timm-named export of the run's teacher; the linear probe on the remat backbone (it used
    to fail in nnx.merge); the attention picture of the last attention stage."""
    from bam_jax.evals import linear_probe, pictures
    from configs import linear_default

    workdir, _ = caformer_run
    out = tmp_path / "teacher.safetensors"
    assert convert.main(["--workdir", workdir, "--export_safetensors", str(out)]) == 0
    step, teacher = convert.backbone_from_workdir(workdir)
    assert step == 4 and isinstance(teacher, models.CAFormer)
    exported = safetensors_numpy.load_file(str(out))
    assert exported["stem.conv.weight"].shape == (8, 1, 7, 7)
    np.testing.assert_array_equal(exported["head.norm.bias"],
                                  np.asarray(teacher.head_norm.bias.get_value()))

    config = linear_default.get_config()
    config.pretrained_workdir = workdir
    config.num_train_steps = 2
    config.batch_size = 16
    config.eval_batch_size = 256
    config.async_checkpointing = False
    config.mesh.num_devices = 2
    result = linear_probe.train_linear(config, str(tmp_path / "linear"))
    assert result["step"] == 2 and 0.0 <= result["linear_top1"] <= 100.0

    paths = pictures.make_pictures(workdir)
    assert any(p.endswith("attention.png") for p in paths)


def test_finetuning_and_video_segmentation_take_the_caformer(caformer_run, tmp_path):
    """Layer decay by stage (the head's factor 1, the stem's decay ** 5), 2 fine-tuning steps,
    and label propagation on its stride-32 map of 64-pixel synthetic videos."""
    from bam_jax.evals import finetune, video_segmentation
    from configs import finetune_default

    workdir, _ = caformer_run
    config = finetune_default.get_config()
    config.update(pretrained_workdir=workdir, label_fraction=0.1, num_train_steps=2,
                  batch_size=16, eval_batch_size=250, async_checkpointing=False)
    config.mesh.num_devices = 2
    result = finetune.finetune(config, str(tmp_path / "finetune"))
    assert result["step"] == 2 and 0.0 <= result["finetune_top1"] <= 100.0
    step, teacher = convert.backbone_from_workdir(workdir)
    classifier = finetune.Classifier(teacher, 10, rngs=nnx.Rngs(0))
    scales = {"/".join(map(str, path)): float(v.get_value()) for path, v in nnx.to_flat_state(
        finetune.layer_scales(nnx.state(classifier, nnx.Param), 0.5))}
    assert scales["head/kernel"] == 1.0
    assert scales["backbone/stages/3/blocks/0/mlp/fc1/kernel"] == 0.5 ** 1
    assert scales["backbone/stages/0/blocks/0/mlp/fc1/kernel"] == 0.5 ** 4
    assert min(scales.values()) == 0.5 ** 5  # the stem

    overrides = video_segmentation.overrides_config()
    overrides.video.update(synthetic_sequences=1, synthetic_frames=4)
    overrides.mesh.num_devices = 2
    copy = str(tmp_path / "run")  # the evaluation appends to the run's metrics.jsonl
    shutil.copytree(workdir, copy)
    video_segmentation.evaluate(copy, overrides, output_dir=str(tmp_path / "video"))
    assert (tmp_path / "video" / "per_sequence.csv").exists()


def test_remat_cuts_the_saved_activations_the_benchmark_reports():
    """`benchmark --compile_only`'s saved activations (traced, not compiled): remat in groups
    keeps only the group inputs."""
    from bam_jax import sharding, train
    from bam_jax.tools import benchmark

    saved = {}
    for every in (0, 2):
        config = _tiny_caformer_config()
        config.model.caformer.remat_every = every
        config.mesh.num_devices = 1
        mesh = sharding.make_mesh(config)
        graphdef, _, state, _ = train.state_layout(
            train.run_model_factory(config), train.make_optimizer(config), True, mesh, 2**18)
        batch = train.abstract_batch(config, 1, None)
        saved[every] = benchmark.saved_activation_bytes(config, graphdef, state, batch)
    assert 0 < saved[2] < saved[0] / 2
