"""Weight conversion against a PyTorch ViT laid out like timm / DINO / the official BAM ViT."""

import argparse
import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
nn = torch.nn
F = torch.nn.functional

from bam_jax.tools import convert  # noqa: E402

# Compared with PyTorch references at tight tolerances: the optimized programs users run.
pytestmark = pytest.mark.xla_optimized

IMG, PATCH, DIM, DEPTH, HEADS = 32, 8, 64, 2, 4


class _Gamma(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(1.0 + 0.5 * torch.randn(dim))


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim, heads, layer_scale):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _Attention(dim, heads), _Mlp(dim)
        self.ls1 = _Gamma(dim) if layer_scale else None
        self.ls2 = _Gamma(dim) if layer_scale else None

    def forward(self, x):
        y = self.attn(self.norm1(x))
        x = x + (y * self.ls1.gamma if self.ls1 is not None else y)
        y = self.mlp(self.norm2(x))
        return x + (y * self.ls2.gamma if self.ls2 is not None else y)


class TorchViT(nn.Module):
    """timm VisionTransformer's state-dict names and forward (CLS, dynamic_img_size=True).

    Other crop sizes resample pos_embed like timm's `resample_abs_pos_embed` (the official BAM
    ViT): F.interpolate bicubic with antialias=True (timm's default).
    """

    def __init__(self, *, layer_scale=False):
        super().__init__()
        self.grid = IMG // PATCH
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        # Random rather than sin-cos, so a row/column mix-up cannot hide.
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid ** 2, DIM))
        self.blocks = nn.ModuleList([_Block(DIM, HEADS, layer_scale) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM, eps=1e-6)
        with torch.no_grad():  # LayerNorms away from the identity, so a swapped scale/bias shows
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.add_(0.3 * torch.randn_like(param))

    def forward(self, images):
        x = self.patch_embed.proj(images)
        b, d, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if (gh, gw) != (self.grid, self.grid):
            grid = pos[:, 1:].reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
            pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], dim=1)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def _features(jax_model, torch_model, size, seed=0):
    images = np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda x: jax_model(x, deterministic=True))(images))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    return ours, theirs


def _prefixed(model, prefix):
    return {prefix + k: v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return TorchViT(), TorchViT()  # teacher, student


@pytest.fixture(scope="module")
def dino_checkpoint(nets, tmp_path_factory):
    """DINO's layout: per-network dicts, DDP `module.` and wrapper `backbone.` prefixes, a head."""
    teacher, student = nets
    path = tmp_path_factory.mktemp("ckpt") / "dino.pth"
    head = {"module.head.last_layer.weight": torch.randn(8, DIM)}
    torch.save({"teacher": {**_prefixed(teacher, "module.backbone."), **head},
                "student": _prefixed(student, "module.backbone."),
                "args": argparse.Namespace(arch="vit_small", lr=5e-4), "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def teacher_jax(dino_checkpoint):
    return convert.load_torch_vit(str(dino_checkpoint), num_heads=HEADS)


def test_teacher_features_match_torch_at_native_size(nets, teacher_jax):
    ours, theirs = _features(teacher_jax, nets[0], IMG)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_student_is_selected_by_checkpoint_key(nets, dino_checkpoint):
    student = convert.load_torch_vit(str(dino_checkpoint), checkpoint_key="student",
                                     num_heads=HEADS)
    ours, theirs = _features(student, nets[1], IMG)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_official_bam_layout_and_unused_keys_are_reported(nets, tmp_path, caplog):
    """main_pretrain.py saves {'model': StudentTeacherWrapper.state_dict(), 'args': Namespace}."""
    teacher, student = nets
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {**_prefixed(teacher, "teacher.module.backbone."),
                          **_prefixed(student, "student.module.backbone."),
                          "teacher.module.proj_head.0.weight": torch.randn(8, DIM)},
                "args": argparse.Namespace(arch="vit_small"), "epoch": 1}, path)
    with caplog.at_level(logging.WARNING, logger="bam_jax.tools.convert"):
        model = convert.load_torch_vit(str(path), checkpoint_key="teacher", num_heads=HEADS)
    assert "proj_head.0.weight" in caplog.text and "student.* (" in caplog.text
    ours, theirs = _features(model, teacher, IMG)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [48, 24])
def test_other_crop_sizes(nets, teacher_jax, size):
    """The official timm resampling of the position table (bicubic, antialias=True)."""
    reference = TorchViT()
    reference.load_state_dict(nets[0].state_dict())
    ours, theirs = _features(teacher_jax, reference, size)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_layer_scale_is_folded(tmp_path):
    """The official vit_*_LS: LayerScale gammas fold into attn.proj / mlp.fc2."""
    torch.manual_seed(1)
    net = TorchViT(layer_scale=True)
    path = tmp_path / "ls.pth"
    torch.save(net.state_dict(), path)
    ours, theirs = _features(convert.load_torch_vit(str(path), num_heads=HEADS), net, IMG)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_missing_key_is_one_clear_line(nets, tmp_path):
    state = nets[0].state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError,
                       match=r"lacks 1 required ViT key\(s\): blocks.1.mlp.fc2.weight") as info:
        convert.load_torch_vit(str(path), num_heads=HEADS)
    assert "\n" not in str(info.value)


def test_export_import_round_trip_is_exact(nets, teacher_jax, tmp_path):
    path = str(tmp_path / "vit.safetensors")
    convert.save_vit_safetensors(teacher_jax, path)
    exported = safetensors_numpy.load_file(path)
    original = nets[0].state_dict()
    assert set(exported) == set(original)
    for key, value in original.items():  # a pure re-layout: bit-exact
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)

    again = convert.load_vit_safetensors(path)  # num_heads from the file's metadata
    for key, value in convert.vit_to_timm(again).items():
        np.testing.assert_array_equal(value, exported[key], err_msg=key)

    timm_user = TorchViT()  # what a timm/DINO user does with the file
    timm_user.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    ours, theirs = _features(again, timm_user, IMG, seed=1)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_cli_import_and_usage_errors(dino_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert convert.main(["--torch_checkpoint", str(dino_checkpoint), "--output", str(out),
                         "--num_heads", str(HEADS)]) == 0
    assert "width 64, depth 2, heads 4, patch 8, native crop 32" in capsys.readouterr().out
    assert convert.load_vit_safetensors(str(out)).blocks[0].attn.num_heads == HEADS
    with pytest.raises(SystemExit):
        convert.main(["--torch_checkpoint", str(dino_checkpoint)])
    assert convert.main(["--torch_checkpoint", str(tmp_path / "absent.pth"), "--output",
                         str(out)]) == 2
    assert "convert: error:" in capsys.readouterr().err


def _tiny_vit_config_and_state():
    """A 2-block ViT pretraining config with a teacher, and its initial train state."""
    from bam_jax import train
    from configs import default as default_config

    config = default_config.get_config()
    config.model.update(backbone="vit", vit_variant="custom", width=32, depth=2, num_heads=2,
                        patch_size=4)
    config.model.projector.update(hidden_dim=32, out_dim=16)
    config.teacher.enabled = True
    return config, train.init_state(train.run_model_factory(config), train.make_optimizer(config),
                                    True)


def test_export_from_workdir(tmp_path):
    """A bam_jax run's checkpoint (written by the trainer's own Checkpointer) -> timm names."""
    from flax import nnx

    from bam_jax import checkpoint, train

    config, state = _tiny_vit_config_and_state()
    # A teacher unlike the student, so the test sees which one is exported.
    state = state.replace(teacher_params=jax.tree.map(lambda p: p + 1.0, state.params))
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(7, state, config)
    ckpt.close()

    out = tmp_path / "teacher.safetensors"
    assert convert.main(["--workdir", str(tmp_path), "--export_safetensors", str(out)]) == 0
    exported = safetensors_numpy.load_file(str(out))
    teacher = nnx.merge(nnx.graphdef(train.run_model_factory(config)()), state.teacher_params,
                        state.teacher_model_state).backbone
    for key, value in convert.vit_to_timm(teacher).items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert exported["patch_embed.proj.weight"].shape == (32, 1, 4, 4)

    step, student = convert.backbone_from_workdir(str(tmp_path), config, checkpoint_key="student")
    assert step == 7
    np.testing.assert_array_equal(np.asarray(student.cls_token.get_value()),
                                  np.asarray(state.params["backbone"]["cls_token"].get_value()))


def _two_step_vit_run(workdir):
    """Steps 2 and 4 of a tiny ViT run (teachers +2 and +4 off the student), written by the
    trainer's Checkpointer; returns the config and the state of step 2."""
    from bam_jax import checkpoint

    config, state = _tiny_vit_config_and_state()
    writer = checkpoint.Checkpointer(workdir, async_save=False)
    states = {}
    for step in (2, 4):
        states[step] = state.replace(
            teacher_params=jax.tree.map(lambda p, s=step: p + float(s), state.params))
        writer.save(step, states[step], config)
    writer.close()
    return config, states[2]


def _files(root):
    listing = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            status = os.lstat(os.path.join(folder, name))
            listing[os.path.relpath(os.path.join(folder, name), root)] = (status.st_size,
                                                                          status.st_mtime_ns)
    return listing


@pytest.mark.parametrize("damage", ["truncated_metadata", "no_state_item", "empty_step_dir",
                                    "overwrite_data"])
def test_export_falls_back_past_a_damaged_newest_step(tmp_path, capsys, damage):
    """Was: `'NoneType' object has no attribute 'tree'` (the newest step's metadata read first).
    Also: the run's save in flight is left alone and nothing in the workdir changes."""
    from flax import nnx

    from bam_jax import train

    workdir = str(tmp_path / "run")
    config, step_2 = _two_step_vit_run(workdir)
    step_dir = os.path.join(workdir, "checkpoints", "4")
    if damage == "truncated_metadata":
        with open(os.path.join(step_dir, "state", "_METADATA"), "r+b") as f:
            f.truncate(100)
    elif damage == "no_state_item":
        shutil.rmtree(os.path.join(step_dir, "state"))
    elif damage == "empty_step_dir":
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)
    else:
        for path in glob.glob(os.path.join(step_dir, "state", "d", "*")):
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 4)
                f.write(os.urandom(512))
    os.makedirs(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1733000000", "state"))
    before = _files(workdir)

    out = tmp_path / "teacher.safetensors"
    assert convert.main(["--workdir", workdir, "--export_safetensors", str(out)]) == 0
    assert f"from {workdir} step 2 (teacher)" in capsys.readouterr().out
    assert _files(workdir) == before
    exported = safetensors_numpy.load_file(str(out))
    teacher = nnx.merge(nnx.graphdef(train.run_model_factory(config)()), step_2.teacher_params,
                        step_2.teacher_model_state).backbone
    for key, value in convert.vit_to_timm(teacher).items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_export_with_every_step_unreadable_is_one_line(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    _two_step_vit_run(workdir)
    for step in ("2", "4"):
        shutil.rmtree(os.path.join(workdir, "checkpoints", step, "state"))
    assert convert.main(["--workdir", workdir, "--export_safetensors",
                         str(tmp_path / "x.safetensors")]) == 2
    _assert_one_error_line(capsys.readouterr().err, "none of the checkpoints [2, 4] in")


def _assert_one_error_line(err, expected):
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("bam_jax.tools.convert: error: "), err
    assert expected in errors[0], errors[0]


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty: not a PyTorch checkpoint"),
    (b"\x13" + bytes(range(256)) * 8, "is not a PyTorch checkpoint (neither a zip archive nor"),
    (None, "is truncated or damaged: PytorchStreamReader failed reading zip archive"),
])
def test_unreadable_pth_is_one_line_naming_the_file(dino_checkpoint, tmp_path, capsys, content,
                                                   expected):
    """Was: an EOFError traceback (empty), torch's advice to retry with weights_only=False
    (random bytes)."""
    if content is None:  # a download cut in half
        content = dino_checkpoint.read_bytes()[:2000]
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    assert convert.main(["--torch_checkpoint", str(path), "--output",
                         str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err, f"{path} {expected}")
    assert "weights_only=False" not in err
