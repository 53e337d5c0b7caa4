"""ViT and CAFormer weights between bam_jax and PyTorch (official BAM, DINO, timm key names).

Import an official BAM / DINO checkpoint into a safetensors file that bam_jax loads:
    python -m bam_jax.tools.convert --torch_checkpoint=checkpoint.pth --checkpoint_key=teacher \
        --num_heads=12 --output=bam_vit_s16.safetensors
Export the teacher of a bam_jax run for timm / DINO users:
    python -m bam_jax.tools.convert --workdir=DIR [--config=configs/vit_s.py] \
        --export_safetensors=out.safetensors

The interchange file is safetensors with timm key names (cls_token, pos_embed [1, 1+N, D],
patch_embed.proj.weight [D, C, p, p], blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}, norm) plus `num_heads` in its metadata, since heads cannot be read off the weights. In
timm: `m = timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12,
dynamic_img_size=True); m.load_state_dict(safetensors.torch.load_file(path))`.

CAFormer (`--arch=caformer`): official BAM CAFormer checkpoints and timm `caformer_*` state dicts
(timm key names: stem.conv, stem.norm, stages.i.downsample.{norm,conv},
stages.i.blocks.j.{norm1, token_mixer.{pwconv1, act1, dwconv, pwconv2 | qkv, proj}, res_scale1,
norm2, mlp.{fc1, act, fc2}, res_scale2}, head.norm) import into our `models.CAFormer`; depths,
widths, the activation (GELU, or StarReLU when `act.scale` tensors are present), res-scales and
qkv bias are read off the keys and shapes; timm's classifier (`head.fc.*`) is reported and left
out. Export writes the same names (metadata: `format=timm-caformer`, depths, dims, act,
res_scale). In timm: `timm.create_model("caformer_m36", num_classes=0, mlp_act=nn.GELU,
act1_layer=nn.GELU, res_scale_init_values=(None,) * 4)` for a BAM-recipe model.
    python -m bam_jax.tools.convert --arch=caformer --torch_checkpoint=checkpoint.pth \
        --output=bam_caformer_m36.safetensors

Crop sizes: `models.VisionTransformer` resamples the position table for other crop sizes with
torch's antialiased bicubic, as the official BAM ViT (timm `resample_abs_pos_embed`) does, so
a converted official checkpoint gives the PyTorch model's features at every crop size. DINO's own
ViT (`interpolate_pos_encoding`: scale_factor with a +0.1 offset, no antialiasing) resamples
differently, so a DINO checkpoint matches its PyTorch model at the native size only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from bam_jax import cli, models

_LOG = logging.getLogger(__name__)

ROLES = ("teacher", "student")
# Wrappers around the backbone that the official `load_pretrained_weights` strips.
_WRAPPER_SEGMENTS = ("module", "_orig_mod")
_BACKBONE_PREFIXES = ("backbone", "base_encoder")
# Keys under these names change the network: if we cannot map one, importing must fail.
_BACKBONE_NAMES = ("blocks", "patch_embed", "reg_token", "norm_pre", "cls_token", "pos_embed",
                   "norm")


# ---------------------------------------------------------------------------------------------
# The one table of names: timm key <-> path of the nnx variable, and how the tensor changes.
# ---------------------------------------------------------------------------------------------
def _layout(depth: int, qkv_bias: bool) -> list[tuple[str, tuple, str]]:
    """(timm key, nnx path, kind) for every backbone tensor; kind says how it is re-laid-out."""
    table = [("cls_token", ("cls_token",), "same"), ("pos_embed", ("pos_embed",), "pos"),
             ("patch_embed.proj.weight", ("patch_kernel",), "conv"),
             ("patch_embed.proj.bias", ("patch_bias",), "same")]
    for i in range(depth):
        for name, path, kind in (("norm1", ("norm1",), "norm"),
                                 ("attn.qkv", ("attn", "qkv"), "linear"),
                                 ("attn.proj", ("attn", "proj"), "linear"),
                                 ("norm2", ("norm2",), "norm"),
                                 ("mlp.fc1", ("mlp", "fc1"), "linear"),
                                 ("mlp.fc2", ("mlp", "fc2"), "linear")):
            weight = ("scale",) if kind == "norm" else ("kernel",)
            table.append((f"blocks.{i}.{name}.weight", ("blocks", i, *path, *weight), kind))
            if name != "attn.qkv" or qkv_bias:
                table.append((f"blocks.{i}.{name}.bias", ("blocks", i, *path, "bias"), "same"))
    table += [("norm.weight", ("norm", "scale"), "norm"), ("norm.bias", ("norm", "bias"), "same")]
    return table


def _to_ours(kind: str, value: np.ndarray) -> np.ndarray:
    if kind == "pos":  # [1, 1+N, D] -> [1+N, D]
        return value[0]
    if kind == "conv":  # OIHW -> [(p1 p2 c), D], the order models._patchify flattens a patch in
        d, c, p1, p2 = value.shape
        return value.transpose(2, 3, 1, 0).reshape(p1 * p2 * c, d)
    if kind == "linear":  # torch [out, in] -> flax [in, out]
        return value.T
    return value


def _to_timm(kind: str, value: np.ndarray, patch_size: int) -> np.ndarray:
    if kind == "pos":
        return value[None]
    if kind == "conv":
        d = value.shape[1]
        c = value.shape[0] // (patch_size * patch_size)
        return value.reshape(patch_size, patch_size, c, d).transpose(3, 2, 0, 1)
    if kind == "linear":
        return value.T
    return value


def _variable(model: nnx.Module, path: tuple) -> nnx.Variable:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


# ---------------------------------------------------------------------------------------------
# timm names -> our VisionTransformer.
# ---------------------------------------------------------------------------------------------
def _canonicalise(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrite the timm variants we can express exactly onto plain timm names.

    LayerScale (the official `vit_*_LS`) is folded into the Linear before it; `fc_norm` (timm
    with use_fc_norm, where `norm` is Identity) is the same LayerNorm on the CLS token; a
    pos_embed without the CLS row (timm no_embed_class) equals one with a zero CLS row.
    """
    out = dict(tensors)
    for key in [k for k in out if re.fullmatch(r"blocks\.\d+\.ls[12]\.gamma", k)]:
        gamma = out.pop(key)
        linear = key.replace("ls1.gamma", "attn.proj").replace("ls2.gamma", "mlp.fc2")
        out[f"{linear}.weight"] = out[f"{linear}.weight"] * gamma[:, None]
        out[f"{linear}.bias"] = out[f"{linear}.bias"] * gamma
    if "norm.weight" not in out and "fc_norm.weight" in out:
        out["norm.weight"], out["norm.bias"] = out.pop("fc_norm.weight"), out.pop("fc_norm.bias")
    pos = out.get("pos_embed")
    if (pos is not None and pos.ndim == 3 and not _is_square(pos.shape[1] - 1)
            and _is_square(pos.shape[1])):
        out["pos_embed"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    return out


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def vit_from_timm(tensors: Mapping[str, np.ndarray], *, num_heads: int,
                  freeze_patch_embed: bool = True) -> tuple[models.VisionTransformer, list[str]]:
    """Our ViT holding timm-named backbone tensors; returns it and the keys it did not use.

    Width, depth, patch size, channels, MLP ratio, qkv bias and native crop size come from the
    shapes; `num_heads` cannot, so it is an argument. Raises ValueError (one line) when required
    keys are missing, a shape disagrees, or a backbone key has no counterpart here.
    """
    tensors = _canonicalise(tensors)
    for required in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if required not in tensors:
            raise ValueError(f"no {required!r} among the {len(tensors)} tensors: not a timm/DINO "
                             f"ViT state dict (first keys: {', '.join(sorted(tensors)[:5])})")
    width, channels, patch, patch_w = tensors["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise ValueError(f"non-square patches {patch}x{patch_w} are not supported")
    tokens = tensors["pos_embed"].shape[1] - 1
    if not _is_square(tokens):
        raise ValueError(f"pos_embed has {tokens} patch positions: not a square grid")
    depth = 1 + max((int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))),
                    default=-1)
    if depth == 0:
        raise ValueError("no blocks.N.* tensors: not a ViT state dict")
    hidden = tensors["blocks.0.mlp.fc1.weight"].shape[0]
    qkv_bias = "blocks.0.attn.qkv.bias" in tensors
    layout = _layout(depth, qkv_bias)
    missing = [key for key, _, _ in layout if key not in tensors]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} required ViT key(s): "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    used = {key for key, _, _ in layout}
    unsupported = sorted(k for k in tensors if k not in used and k.split(".")[0] in _BACKBONE_NAMES)
    if unsupported:
        raise ValueError(f"backbone tensors this ViT cannot represent: "
                         f"{', '.join(unsupported[:8])}")

    model = nnx.eval_shape(lambda: models.VisionTransformer(
        image_size=math.isqrt(tokens) * patch, patch_size=patch, in_channels=channels,
        width=width, depth=depth, num_heads=num_heads, mlp_ratio=hidden / width,
        qkv_bias=qkv_bias, freeze_patch_embed=freeze_patch_embed, rngs=nnx.Rngs(0)))
    for key, path, kind in layout:
        variable = _variable(model, path)
        value = _to_ours(kind, np.asarray(tensors[key], np.float32))
        if value.shape != variable.get_value().shape:
            raise ValueError(f"{key}: shape {tensors[key].shape} does not fit a ViT of width "
                             f"{width}, depth {depth}, patch {patch}")
        variable.set_value(jnp.asarray(value))
    return model, sorted(k for k in tensors if k not in used)


def vit_to_timm(model: models.VisionTransformer) -> dict[str, np.ndarray]:
    """timm-named float32 tensors of our ViT (the inverse of `vit_from_timm`)."""
    qkv_bias = model.blocks[0].attn.qkv.bias is not None
    return {key: np.ascontiguousarray(_to_timm(kind, np.asarray(
                _variable(model, path).get_value(), np.float32), model.patch_size))
            for key, path, kind in _layout(model.depth, qkv_bias)}


def _summarise(keys: list[str]) -> str:
    """'proj_head.* (6), head.weight': readable even for the hundreds of keys of another role."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".")[0], []).append(key)
    return ", ".join(names[0] if len(names) == 1 else f"{head}.* ({len(names)})"
                     for head, names in sorted(groups.items()))


def _report_unused(source: str, keys: list[str]) -> None:
    if keys:
        _LOG.warning("%s: not part of the backbone, not imported: %s", source, _summarise(keys))


# ---------------------------------------------------------------------------------------------
# timm names <-> our CAFormer.
# ---------------------------------------------------------------------------------------------
_CAFORMER_BACKBONE_NAMES = ("stem", "stages")


def _caformer_layout(depths, dims, *, act: str, res_scale: bool, qkv_bias: bool
                     ) -> list[tuple[str, tuple, str]]:
    """(timm key, nnx path, kind) for every CAFormer tensor. Kinds: "conv" (OIHW -> HWIO),
    "pw" (a 1x1 conv [out, in, 1, 1] -> Dense [in, out]), "linear", "same"."""
    table = [("stem.conv.weight", ("stem", "conv", "kernel"), "conv"),
             ("stem.conv.bias", ("stem", "conv", "bias"), "same"),
             ("stem.norm.weight", ("stem", "norm", "scale"), "same")]
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        stage, path = f"stages.{i}", ("stages", i)
        if i > 0 and dims[i - 1] != dim:
            table += [(f"{stage}.downsample.norm.weight", (*path, "downsample", "norm", "scale"),
                       "same"),
                      (f"{stage}.downsample.conv.weight", (*path, "downsample", "conv", "kernel"),
                       "conv"),
                      (f"{stage}.downsample.conv.bias", (*path, "downsample", "conv", "bias"),
                       "same")]
        attention = models.caformer.MIXERS[i] == "attention"
        dense = "linear" if attention else "pw"
        for j in range(depth):
            key, block = f"{stage}.blocks.{j}", (*path, "blocks", j)
            rows = [("norm1.weight", ("norm1", "scale"), "same")]
            if attention:
                rows += [("token_mixer.qkv.weight", ("token_mixer", "qkv", "kernel"), "linear"),
                         ("token_mixer.proj.weight", ("token_mixer", "proj", "kernel"), "linear")]
                if qkv_bias:
                    rows.append(("token_mixer.qkv.bias", ("token_mixer", "qkv", "bias"), "same"))
            else:
                rows += [("token_mixer.pwconv1.weight", ("token_mixer", "pwconv1", "kernel"), "pw"),
                         ("token_mixer.dwconv.weight", ("token_mixer", "dwconv", "kernel"), "conv"),
                         ("token_mixer.pwconv2.weight", ("token_mixer", "pwconv2", "kernel"), "pw")]
                if act == "starrelu":
                    rows += [("token_mixer.act1.scale", ("token_mixer", "act1", "scale"), "same"),
                             ("token_mixer.act1.bias", ("token_mixer", "act1", "bias"), "same")]
            rows += [("norm2.weight", ("norm2", "scale"), "same"),
                     ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), dense),
                     ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), dense)]
            if act == "starrelu":
                rows += [("mlp.act.scale", ("mlp", "act", "scale"), "same"),
                         ("mlp.act.bias", ("mlp", "act", "bias"), "same")]
            if res_scale and attention:
                rows += [("res_scale1.scale", ("res_scale1", "scale"), "same"),
                         ("res_scale2.scale", ("res_scale2", "scale"), "same")]
            table += [(f"{key}.{name}", (*block, *sub), kind) for name, sub, kind in rows]
    table += [("head.norm.weight", ("head_norm", "scale"), "same"),
              ("head.norm.bias", ("head_norm", "bias"), "same")]
    return table


def _caformer_kind_to_ours(kind: str, value: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return value.transpose(2, 3, 1, 0)
    if kind == "pw":
        return value.reshape(value.shape[0], value.shape[1]).T
    if kind == "linear":
        return value.T
    return value


def _caformer_kind_to_timm(kind: str, value: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return value.transpose(3, 2, 0, 1)
    if kind == "pw":
        return value.T[:, :, None, None]
    if kind == "linear":
        return value.T
    return value


def is_caformer_state(tensors: Mapping[str, np.ndarray]) -> bool:
    return "stem.conv.weight" in tensors and any(k.startswith("stages.") for k in tensors)


def caformer_from_timm(tensors: Mapping[str, np.ndarray], *, remat_every: int = 0
                       ) -> tuple[models.CAFormer, list[str]]:
    """Our CAFormer holding timm-named tensors; returns it and the keys it did not use.

    Everything is read off the keys and shapes. Raises ValueError (one line) when a required key
    is missing, a shape disagrees, or a backbone key (stem.*, stages.*, head.norm.*) has no
    counterpart here (layer-scales, res-scales in the conv stages).
    """
    if "stem.conv.weight" not in tensors:
        raise ValueError(f"no 'stem.conv.weight' among the {len(tensors)} tensors: not a timm/BAM "
                         f"CAFormer state dict (first keys: {', '.join(sorted(tensors)[:5])})")
    channels = tensors["stem.conv.weight"].shape[1]
    depths, dims = [], []
    for i in range(len(models.caformer.MIXERS)):
        blocks = [int(m.group(1)) for k in tensors
                  if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.norm1\.weight$", k))]
        if not blocks:
            raise ValueError(f"no stages.{i}.blocks.*: a CAFormer has "
                             f"{len(models.caformer.MIXERS)} stages")
        depths.append(max(blocks) + 1)
        dims.append(tensors[f"stages.{i}.blocks.0.norm1.weight"].shape[0])
    act = "starrelu" if "stages.0.blocks.0.token_mixer.act1.scale" in tensors else "gelu"
    res_scale = "stages.3.blocks.0.res_scale1.scale" in tensors
    qkv_bias = "stages.3.blocks.0.token_mixer.qkv.bias" in tensors
    layout = _caformer_layout(depths, dims, act=act, res_scale=res_scale, qkv_bias=qkv_bias)
    missing = [key for key, _, _ in layout if key not in tensors]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} required CAFormer key(s): "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    used = {key for key, _, _ in layout}
    unsupported = sorted(k for k in tensors if k not in used and (
        k.split(".")[0] in _CAFORMER_BACKBONE_NAMES or k.startswith("head.norm.")))
    if unsupported:
        raise ValueError(f"backbone tensors this CAFormer cannot represent: "
                         f"{', '.join(unsupported[:8])}")
    model = nnx.eval_shape(lambda: models.CAFormer(
        in_channels=channels, depths=depths, dims=dims, act=act, res_scale=res_scale,
        qkv_bias=qkv_bias, remat_every=remat_every, rngs=nnx.Rngs(0)))
    for key, path, kind in layout:
        variable = _variable(model, path)
        value = _caformer_kind_to_ours(kind, np.asarray(tensors[key], np.float32))
        if value.shape != variable.get_value().shape:
            raise ValueError(f"{key}: shape {tensors[key].shape} does not fit a CAFormer of "
                             f"depths {tuple(depths)}, dims {tuple(dims)}")
        variable.set_value(jnp.asarray(value))
    return model, sorted(k for k in tensors if k not in used)


def _caformer_options(model: models.CAFormer) -> dict:
    first = model.stages[0].blocks[0]
    last = model.stages[-1].blocks[0]
    return dict(act="gelu" if first.mlp.act is None else "starrelu",
                res_scale=last.res_scale1 is not None,
                qkv_bias=last.token_mixer.qkv.bias is not None)


def caformer_to_timm(model: models.CAFormer) -> dict[str, np.ndarray]:
    """timm-named float32 tensors of our CAFormer (the inverse of `caformer_from_timm`)."""
    return {key: np.ascontiguousarray(_caformer_kind_to_timm(kind, np.asarray(
                _variable(model, path).get_value(), np.float32)))
            for key, path, kind in _caformer_layout(model.depths, model.dims,
                                                    **_caformer_options(model))}


def backbone_to_timm(model) -> dict[str, np.ndarray]:
    return caformer_to_timm(model) if isinstance(model, models.CAFormer) else vit_to_timm(model)


# ---------------------------------------------------------------------------------------------
# PyTorch checkpoints (official BAM, DINO, timm) -> timm names -> our ViT.
# ---------------------------------------------------------------------------------------------
def torch_backbone_tensors(path: str, *, checkpoint_key: str = "teacher"
                           ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The backbone tensors of one network in a .pth, under bare timm names, as float32 numpy.

    Layouts: DINO ({'teacher': sd, 'student': sd, ...}), official BAM ({'model': sd} with
    'teacher.'/'student.' prefixes) and a bare state dict. `module.` / `_orig_mod.` segments and a
    leading `backbone.` / `base_encoder.` are stripped as the official loader does. The file is
    read with `weights_only=True` (only tensors and plain containers; `argparse.Namespace`, which
    both official scripts store under 'args', is the one class allowed). Returns the tensors and
    the keys left out (other network, heads).
    """
    import pickle

    import torch

    if checkpoint_key not in ROLES:
        raise ValueError(f"checkpoint_key must be one of {ROLES}, got {checkpoint_key!r}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        raise ValueError(_torch_load_failure(path, error)) from error
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get(checkpoint_key), Mapping):
        state = obj[checkpoint_key]
    elif any(isinstance(obj.get(role), Mapping) for role in ROLES):
        raise ValueError(f"{path} has no {checkpoint_key!r} entry; use --checkpoint_key="
                         f"{next(r for r in ROLES if r != checkpoint_key)}")
    else:
        state = next((obj[k] for k in ("model", "state_dict")
                      if isinstance(obj.get(k), Mapping)), obj)

    named = {}
    for key, value in state.items():
        if torch.is_tensor(value):
            parts = [p for p in key.split(".") if p not in _WRAPPER_SEGMENTS]
            named[".".join(parts)] = value
    roles = {key.split(".")[0] for key in named} & set(ROLES)
    if roles and checkpoint_key not in roles:
        raise ValueError(f"{path} holds no {checkpoint_key} weights (only "
                         f"{', '.join(sorted(roles))}); use --checkpoint_key={roles.pop()}")
    tensors, left_out = {}, []
    for key, value in named.items():
        head, _, rest = key.partition(".")
        if roles:
            if head != checkpoint_key:
                left_out.append(key)
                continue
            key = rest
        head, _, rest = key.partition(".")
        key = rest if head in _BACKBONE_PREFIXES else key
        if value.is_floating_point():
            value = value.detach().to(torch.float32)
        tensors[key] = value.numpy()
    return tensors, left_out


def _torch_load_failure(path: str, error: BaseException) -> str:
    """Why torch.load could not read `path`, in one line. Not torch's own first line: for any
    file that fails `weights_only` it advises weights_only=False, which runs the file's code and
    does not help a damaged or foreign file anyway."""
    import pickle

    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return f"{path} is empty: not a PyTorch checkpoint"
    if not head.startswith(b"PK\x03\x04") and not head.startswith(b"\x80"):
        return f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    if isinstance(error, pickle.UnpicklingError):  # the unpickler's reason is the cause
        return f"{path}: refused by torch.load(weights_only=True): " \
               f"{cli.first_line(error.__context__ or error)}"
    return f"{path} is truncated or damaged: {cli.first_line(error).split('. ')[0]}"


def load_torch_vit(path: str, *, checkpoint_key: str = "teacher", num_heads: int = 12,
                   freeze_patch_embed: bool = True) -> models.VisionTransformer:
    """Our ViT with the weights of an official BAM / DINO / timm PyTorch checkpoint.

    `num_heads` is not stored in a state dict: 12 for the official BAM ViT-S and ViT-B, 6 for
    DINO's and timm's ViT-S. Keys that are not part of the backbone are logged.
    """
    tensors, left_out = torch_backbone_tensors(path, checkpoint_key=checkpoint_key)
    model, unused = vit_from_timm(tensors, num_heads=num_heads,
                                  freeze_patch_embed=freeze_patch_embed)
    _report_unused(path, left_out + unused)
    return model


# ---------------------------------------------------------------------------------------------
# safetensors: the interchange file both ways.
# ---------------------------------------------------------------------------------------------
def load_torch_caformer(path: str, *, checkpoint_key: str = "teacher",
                        remat_every: int = 0) -> models.CAFormer:
    """Our CAFormer with the weights of an official BAM CAFormer checkpoint or a timm
    `caformer_*` state dict (its classifier is logged and left out)."""
    tensors, left_out = torch_backbone_tensors(path, checkpoint_key=checkpoint_key)
    model, unused = caformer_from_timm(tensors, remat_every=remat_every)
    _report_unused(path, left_out + unused)
    return model


def save_vit_safetensors(model, path: str) -> None:
    """Write our ViT (or CAFormer) under timm names; the metadata says what the names cannot
    (a ViT's `num_heads`; a CAFormer's depths, dims, activation, res-scales)."""
    from safetensors.numpy import save

    if isinstance(model, models.CAFormer):
        metadata = {"format": "timm-caformer", "depths": json.dumps(list(model.depths)),
                    "dims": json.dumps(list(model.dims)),
                    **{k: str(v) for k, v in _caformer_options(model).items()}}
    else:
        metadata = {"format": "timm-vit", "num_heads": str(model.blocks[0].attn.num_heads)}
    # Bytes through epath, so a gs:// destination works as a local one.
    epath.Path(path).write_bytes(save(backbone_to_timm(model), metadata=metadata))


save_backbone_safetensors = save_vit_safetensors


def load_vit_safetensors(path: str, *, num_heads: int | None = None,
                         freeze_patch_embed: bool = True):
    """Our ViT from a timm-named safetensors file (ours, or timm's with `num_heads` given);
    a CAFormer when the file holds CAFormer names."""
    from safetensors.numpy import load

    raw = epath.Path(path).read_bytes()  # local or gs://
    tensors = load(raw)
    metadata = _safetensors_metadata(raw)
    if metadata.get("format") == "timm-caformer" or is_caformer_state(tensors):
        model, unused = caformer_from_timm(tensors)
        _report_unused(path, unused)
        return model
    if num_heads is None:
        if "num_heads" not in metadata:
            raise ValueError(f"{path} does not record num_heads; pass it")
        num_heads = int(metadata["num_heads"])
    model, unused = vit_from_timm(tensors, num_heads=num_heads,
                                  freeze_patch_embed=freeze_patch_embed)
    _report_unused(path, unused)
    return model


load_backbone_safetensors = load_vit_safetensors


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file: its header is 8 bytes of length, then JSON."""
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return header.get("__metadata__") or {}


# ---------------------------------------------------------------------------------------------
# bam_jax workdirs.
# ---------------------------------------------------------------------------------------------
def backbone_from_workdir(workdir: str, config=None, *, checkpoint_key: str = "teacher"
                          ) -> tuple[int, models.VisionTransformer | models.CAFormer]:
    """(step, ViT or CAFormer backbone) of the newest readable checkpoint of a bam_jax run.

    The state is restored onto one device whatever mesh wrote it, using the checkpoint's own
    shapes, so no dataset is needed to rebuild it; `config` (default: the config saved with the
    checkpoint) supplies what shapes do not say: patch size, heads. The workdir is opened
    read-only: a run still training there keeps its save in flight.
    """
    import ml_collections

    from bam_jax import checkpoint as checkpoint_lib

    if checkpoint_key not in ROLES:
        raise ValueError(f"checkpoint_key must be one of {ROLES}, got {checkpoint_key!r}")
    step, state, saved_config = checkpoint_lib.read_newest(
        workdir, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    if config is None:
        config = ml_collections.ConfigDict(saved_config)

    prefix = "teacher_" if checkpoint_key == "teacher" else ""
    if not state.get(f"{prefix}params"):
        raise ValueError(f"the run in {workdir} has no teacher; use --checkpoint_key=student")
    saved = _merge(state[f"{prefix}params"]["backbone"],
                   (state[f"{prefix}model_state"] or {}).get("backbone", {}))
    if config.model.backbone not in ("vit", "caformer"):
        raise ValueError(f"the run in {workdir} has a {config.model.backbone} backbone; only ViTs "
                         f"and CAFormers have timm names")
    model_config = config.model.copy_and_resolve_references()
    model_config.drop_path_rate = 0.0  # no RNG state: the backbone is for inference and export
    if config.model.backbone == "caformer":
        channels, image_size = saved["stem"]["conv"]["kernel"]["value"].shape[2], 224
    else:
        patch = model_config.patch_size
        channels = saved["patch_kernel"]["value"].shape[0] // (patch * patch)
        image_size = math.isqrt(saved["pos_embed"]["value"].shape[0] - 1) * patch
    backbone = nnx.eval_shape(lambda: models.build_model(
        model_config, num_channels=channels, image_size=image_size, rngs=nnx.Rngs(0))).backbone
    for path, variable in nnx.iter_graph(backbone):
        if isinstance(variable, nnx.Variable):
            node = saved
            for key in path:
                node = node.get(str(key), {}) if isinstance(node, Mapping) else {}
            value = node.get("value")
            if value is None or value.shape != variable.get_value().shape:
                raise ValueError(f"the checkpoint in {workdir} does not match the config at "
                                 f"{'.'.join(map(str, path))}; pass the config the run used")
            variable.set_value(jnp.asarray(value))
    return step, backbone


def _merge(a: Mapping, b: Mapping) -> dict:
    """Deep union of the Param and non-Param halves of one nnx state (disjoint leaves)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), Mapping) else value
    return out


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
def _load_config(path: str):
    """`get_config()` of a config file, as bam_jax.main reads it (the file is run: trust it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bam_jax_convert_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot read config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bam_jax.tools.convert",
        description="Convert ViT / CAFormer weights between PyTorch (official BAM, DINO, timm) "
                    "and bam_jax.",
        epilog="import:  [--arch=caformer] --torch_checkpoint=checkpoint.pth "
               "--output=vit.safetensors [--checkpoint_key=student] [--num_heads=6]\n"
               "export:  --workdir=DIR [--config=configs/vit_s.py] "
               "--export_safetensors=out.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--torch_checkpoint", help="PyTorch .pth to import")
    mode.add_argument("--export_safetensors", help="safetensors file to write from --workdir")
    parser.add_argument("--output", help="safetensors file the import writes")
    parser.add_argument("--arch", choices=("vit", "caformer"), default="vit",
                        help="backbone of the imported checkpoint (default: vit); an export "
                             "takes it from the run's config")
    parser.add_argument("--checkpoint_key", choices=ROLES, default="teacher",
                        help="which network of a student/teacher checkpoint (default: teacher)")
    parser.add_argument("--num_heads", type=int, default=12,
                        help="attention heads of the imported ViT: 12 for the official BAM "
                             "ViT-S/B (default), 6 for DINO/timm ViT-S")
    parser.add_argument("--workdir", help="bam_jax run directory to export from")
    parser.add_argument("--config", help="config file of that run (default: the saved one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.torch_checkpoint and not args.output:
        parser.error("--torch_checkpoint needs --output")
    if args.export_safetensors and not args.workdir:
        parser.error("--export_safetensors needs --workdir")
    logging.basicConfig(level=logging.WARNING, format="convert: %(message)s")
    try:
        if args.torch_checkpoint:
            if args.arch == "caformer":
                model = load_torch_caformer(args.torch_checkpoint,
                                            checkpoint_key=args.checkpoint_key)
            else:
                model = load_torch_vit(args.torch_checkpoint, checkpoint_key=args.checkpoint_key,
                                       num_heads=args.num_heads)
            destination, source = args.output, f"{args.torch_checkpoint} ({args.checkpoint_key})"
        else:
            config = _load_config(args.config) if args.config else None
            step, model = backbone_from_workdir(args.workdir, config,
                                                checkpoint_key=args.checkpoint_key)
            destination = args.export_safetensors
            source = f"{args.workdir} step {step} ({args.checkpoint_key})"
        save_vit_safetensors(model, destination)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(cli.error_line("bam_jax.tools.convert", error), file=sys.stderr, flush=True)
        return 2
    if isinstance(model, models.CAFormer):
        print(f"wrote {destination}: CAFormer depths {model.depths}, dims {model.dims}, "
              f"{_caformer_options(model)['act']} from {source}", flush=True)
        return 0
    grid = model.grid_size[0]
    print(f"wrote {destination}: ViT width {model.embed_dim}, depth {model.depth}, heads "
          f"{model.blocks[0].attn.num_heads}, patch {model.patch_size}, "
          f"native crop {grid * model.patch_size} from {source}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
