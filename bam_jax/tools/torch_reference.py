"""The official BAM PyTorch step, for parity tests and as the benchmark's speed reference.

`official()` builds the reference pieces written from the official code (DanielShalam/BAM:
models/vit.py on timm's VisionTransformer with `dynamic_img_size`, models/heads.py MlpProjHead,
models/wrappers.py MultiCropWrapper and StudentTeacherWrapper, bam/bam_loss.py DistillBAMLoss,
utils.py get_params_groups / update_lr_and_wd) as the official code *intends*: it does not run as
released (`self.masking_fn` is never set, CUDA and torch.distributed are assumed), so the top-k
masking reads `top_k > 0` and there is one process. `tests/test_official_step.py` checks one
bam_jax step against them; `python -m bam_jax.tools.benchmark --torch_reference` times them.

torch is imported only inside the functions that use it: importing torch after TensorFlow in one
process can crash (seen with torchvision), so the benchmark runs the PyTorch step in a child
process (`TorchReference`, which drives `python -m bam_jax.tools.torch_reference`) that never
imports TensorFlow or JAX.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import types


@functools.cache
def official() -> types.SimpleNamespace:
    """The official network, loss and optimizer helpers as torch classes and functions."""
    import torch

    nn = torch.nn
    F = torch.nn.functional

    # ---------------------------------------------------------------------------------------------
    # The reference network: official models/vit.py (timm ViT, MoCo-v3 tricks) and heads/wrappers.
    # ---------------------------------------------------------------------------------------------
    class Attention(nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.qkv = nn.Linear(dim, dim * 3, bias=True)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            x = F.scaled_dot_product_attention(q, k, v)
            return self.proj(x.transpose(1, 2).reshape(b, n, c))


    class Mlp(nn.Module):  # timm.layers.Mlp
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))


    class Block(nn.Module):
        def __init__(self, dim, num_heads, mlp_ratio=4.0):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention(dim, num_heads)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))


    def build_2d_sincos_position_embedding(grid_size, embed_dim, num_prefix_tokens,
                                           temperature=10000.0):
        """models/vit.py, as written (its meshgrid is 'ij')."""
        h, w = grid_size
        grid_w = torch.arange(w, dtype=torch.float32)
        grid_h = torch.arange(h, dtype=torch.float32)
        grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
        pos_dim = embed_dim // 4
        omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
        out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
        out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
        pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h),
                             torch.cos(out_h)], dim=1)[None]
        pe_token = torch.zeros([1, num_prefix_tokens, embed_dim], dtype=torch.float32)
        pos_embed = nn.Parameter(torch.cat([pe_token, pos_emb], dim=1))
        pos_embed.requires_grad = False
        return pos_embed


    def resample_abs_pos_embed(posemb, new_size, old_size, num_prefix_tokens=1):
        """timm.layers.resample_abs_pos_embed: bicubic, antialias=True, prefix tokens kept."""
        if tuple(new_size) == tuple(old_size):
            return posemb
        prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
        dim = posemb.shape[-1]
        posemb = posemb.reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2)
        posemb = F.interpolate(posemb, size=new_size, mode="bicubic", antialias=True)
        posemb = posemb.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([prefix, posemb], dim=1)


    class PatchEmbed(nn.Module):
        def __init__(self, patch, in_chans, dim, img_size):
            super().__init__()
            self.grid_size = (img_size // patch, img_size // patch)
            self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

        def forward(self, x):  # dynamic_img_size: NHWC out
            return self.proj(x).permute(0, 2, 3, 1)


    class ViT(nn.Module):
        """timm VisionTransformer(class_token, global_pool='token', dynamic_img_size=True) with the
        official fixed sin-cos table and frozen patch projection; forward = normed CLS token."""

        def __init__(self, img_size, patch, in_chans, dim, depth, num_heads):
            super().__init__()
            self.patch_embed = PatchEmbed(patch, in_chans, dim, img_size)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = build_2d_sincos_position_embedding(self.patch_embed.grid_size, dim, 1)
            self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.patch_embed.proj.weight.requires_grad = False
            self.patch_embed.proj.bias.requires_grad = False

        def _pos_embed(self, x):
            b, h, w, c = x.shape
            pos_embed = resample_abs_pos_embed(self.pos_embed, (h, w), self.patch_embed.grid_size)
            x = x.reshape(b, -1, c)
            return torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + pos_embed

        def forward(self, x):
            x = self.norm(self.blocks(self._pos_embed(self.patch_embed(x))))
            return x[:, 0]


    class MlpProjHead(nn.Module):  # models/heads.py (init irrelevant: weights are loaded)
        def __init__(self, input_dim, n_layers, hidden_dim, output_dim, use_bn, last_bn, bias=True):
            super().__init__()
            mlp = []
            for i in range(n_layers):
                dim1 = input_dim if i == 0 else hidden_dim
                dim2 = output_dim if i == n_layers - 1 else hidden_dim
                mlp.append(nn.Linear(dim1, dim2, bias=bias))
                if i < n_layers - 1:
                    if use_bn:
                        mlp.append(nn.BatchNorm1d(dim2))
                    mlp.append(nn.GELU())
                elif use_bn and last_bn:
                    mlp.append(nn.BatchNorm1d(dim2, affine=False))
            self.projector = nn.Sequential(*mlp)

        def forward(self, x):
            return self.projector(x)


    class MultiCropWrapper(nn.Module):  # models/wrappers.py, nested_input=True
        def __init__(self, backbone, proj_head):
            super().__init__()
            self.backbone, self.proj_head = backbone, proj_head

        def forward(self, x):
            idx_crops = torch.cumsum(torch.unique_consecutive(
                torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
            start_idx, output = 0, torch.empty(0)
            for end_idx in idx_crops:
                output = torch.cat((output, self.backbone(torch.cat(x[start_idx:end_idx]))))
                start_idx = end_idx
            return self.proj_head(output)


    class StudentTeacherWrapper(nn.Module):  # models/wrappers.py
        def __init__(self, student, teacher, m_schedule):
            super().__init__()
            self.student, self.teacher, self.m_schedule = student, teacher, m_schedule
            for param_s, param_t in zip(self.student.parameters(), self.teacher.parameters()):
                param_t.data.copy_(param_s.data)
                param_t.requires_grad = False

        @torch.no_grad()
        def update_teacher(self):
            m = self.m_schedule[0]
            self.m_schedule = self.m_schedule[1:]
            for param_b, param_m in zip(self.student.parameters(), self.teacher.parameters()):
                param_m.data.mul_(m).add_((1 - m) * param_b.detach().data)

        def forward(self, x):
            student_out = self.student(x)
            with torch.no_grad():
                self.update_teacher()
                teacher_out = self.teacher(x)
            return student_out, teacher_out


    # ---------------------------------------------------------------------------------------------
    # The reference loss: bam/bam_loss.py DistillBAMLoss on one process, as intended.
    # ---------------------------------------------------------------------------------------------
    def get_positive_mask(batch_size_per_crop, n_crops):
        mask = torch.zeros((batch_size_per_crop, batch_size_per_crop * n_crops))
        idx_start_crop = torch.arange(n_crops) * batch_size_per_crop
        for sample_idx in range(batch_size_per_crop):
            mask[sample_idx, sample_idx + idx_start_crop] = 1
        return mask.repeat((n_crops, 1)).bool()


    @torch.no_grad()
    def distributed_sinkhorn(q, num_sink_iter, n_masked):
        q = q / torch.sum(q)
        k, n = q.shape
        r = torch.ones(k) / (k - n_masked)
        c = torch.ones(n) / n
        for _ in range(num_sink_iter):
            q = q * (r / torch.sum(q, dim=1)).unsqueeze(1)
            q = q * (c / torch.sum(q, dim=0)).unsqueeze(0)
        return (q / torch.sum(q, dim=0, keepdim=True)).t()


    class DistillBAMLoss:
        def __init__(self, n_crops, n_lrg_crops, n_tgt_crops, ot_reg, softmax_temperature,
                     num_sinkhorn_iters, top_k):
            self.n_crops, self.n_lrg_crops, self.n_tgt_crops = n_crops, n_lrg_crops, n_tgt_crops
            self.ot_reg, self.softmax_temperature = ot_reg, softmax_temperature
            self.num_sinkhorn_iters, self.top_k = num_sinkhorn_iters, top_k

        @torch.no_grad()
        def _sinkhorn(self, q):
            n, big_n = q.size()
            assignments = q / self.ot_reg
            assignments.masked_fill_(self.pos_mask[:n, :big_n], torch.finfo(q.dtype).min)
            assignments = assignments - torch.max(assignments)
            return distributed_sinkhorn(torch.exp(assignments).t(), self.num_sinkhorn_iters,
                                        n_masked=self.n_tgt_crops)

        def keep_top_values(self, logits, n_crops):
            avg_logits = torch.stack(logits.chunk(n_crops, dim=0)).mean(0)
            topk_indices = avg_logits.topk(self.top_k, dim=-1).indices.repeat(n_crops, 1)
            logits_masked = torch.zeros_like(logits)
            logits_masked.scatter_(-1, topk_indices, logits.gather(-1, topk_indices))
            return logits_masked

        def compute_loss(self, q, q_tgt):
            num_large_crops = self.n_lrg_crops
            batch_size_per_crop = q.size(0) // self.n_crops
            self.pos_mask = get_positive_mask(batch_size_per_crop, self.n_crops)[:, :q.size(1)]
            with torch.no_grad():
                p = self._sinkhorn(q_tgt.detach())[:batch_size_per_crop * num_large_crops]
                if self.top_k > 0:  # the official tests an attribute it never sets (masking_fn)
                    p = self.keep_top_values(p, n_crops=num_large_crops)
                    p = p / p.sum(dim=-1, keepdim=True)
                p = p.chunk(num_large_crops)
            q = q / self.softmax_temperature
            q = q.masked_fill(self.pos_mask, torch.finfo(q.dtype).min)
            log_q = F.log_softmax(q, dim=-1).chunk(self.n_crops)
            loss_pos_mask = (~self.pos_mask[:batch_size_per_crop]).to(log_q[0].dtype)
            loss = 0.0
            for v_tgt in range(num_large_crops):
                sub_loss, n_sub_loss = 0, 0
                for v_src in range(self.n_crops):
                    if v_tgt == v_src and self.n_crops > 1:
                        continue
                    sub_loss -= ((p[v_tgt] * log_q[v_src]) * loss_pos_mask).sum(dim=-1).mean()
                    n_sub_loss += 1
                loss += sub_loss / n_sub_loss
            return loss / num_large_crops

        def __call__(self, z, z_teacher):
            bs_per_crop = z.size(0) // self.n_crops
            z = F.normalize(z, dim=-1)
            z_teacher = F.normalize(z_teacher, dim=-1)
            # gather_sort on one process: the first n_tgt_crops views of every image
            z_teacher_gathered = z_teacher[:bs_per_crop * self.n_tgt_crops]
            return self.compute_loss(q=z @ z_teacher_gathered.t(),
                                     q_tgt=z_teacher @ z_teacher_gathered.t())


    def get_params_groups(model):  # utils.py
        regularized, not_regularized = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith(".bias") or len(param.shape) == 1:
                not_regularized.append(param)
            else:
                regularized.append(param)
        return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


    def update_lr_and_wd(optimizer, lr_schedule, wd_schedule, it):  # utils.py
        for i, param_group in enumerate(optimizer.param_groups):
            param_group["lr"] = lr_schedule[it]
            if i == 0:
                param_group["weight_decay"] = wd_schedule[it]
        return lr_schedule[it], wd_schedule[it]

    return types.SimpleNamespace(
        Attention=Attention,
        Mlp=Mlp,
        Block=Block,
        build_2d_sincos_position_embedding=build_2d_sincos_position_embedding,
        resample_abs_pos_embed=resample_abs_pos_embed,
        PatchEmbed=PatchEmbed,
        ViT=ViT,
        MlpProjHead=MlpProjHead,
        MultiCropWrapper=MultiCropWrapper,
        StudentTeacherWrapper=StudentTeacherWrapper,
        get_positive_mask=get_positive_mask,
        distributed_sinkhorn=distributed_sinkhorn,
        DistillBAMLoss=DistillBAMLoss,
        get_params_groups=get_params_groups,
        update_lr_and_wd=update_lr_and_wd,
    )


# ---------------------------------------------------------------------------------------------
# The official step as a speed reference (`bam_jax.tools.benchmark --torch_reference`).
# ---------------------------------------------------------------------------------------------
def spec_from_config(config, num_channels: int) -> dict:
    """The official step equivalent to a bam_jax ViT config, as plain JSON-able values."""
    from bam_jax.models.vit import VIT_PRESETS  # noqa: PLC0415 (jax: the parent process only)

    model, data, loss, opt = config.model, config.data, config.loss, config.optimizer
    if (model.backbone != "vit" or model.projector.act != "gelu" or opt.name != "adamw"
            or not config.teacher.enabled):
        raise ValueError("the PyTorch reference is the official ViT recipe: a ViT backbone, a "
                         "GELU projector, AdamW and an EMA teacher")
    width, depth, num_heads = (VIT_PRESETS[model.vit_variant] if model.vit_variant != "custom"
                               else (model.width, model.depth, model.num_heads))
    return dict(
        batch_size=config.batch_size, channels=num_channels, patch=model.patch_size,
        width=width, depth=depth, num_heads=num_heads,
        global_crops=data.global_crops_number, global_size=data.global_crop_size,
        local_crops=data.local_crops_number, local_size=data.local_crop_size,
        n_layers=model.projector.n_layers, hidden_dim=model.projector.hidden_dim,
        out_dim=model.projector.out_dim, use_bn=model.projector.use_bn,
        last_bn=model.projector.last_bn, num_target_crops=loss.num_target_crops,
        sinkhorn_reg=loss.sinkhorn_reg, temperature=loss.temperature,
        sinkhorn_iters=loss.sinkhorn_iters, top_k=loss.top_k,
        momentum=config.teacher.momentum,
        lr=opt.base_lr * config.batch_size / 256, weight_decay=opt.weight_decay,
        clip_grad=opt.clip_grad)


def official_train_step(spec: dict):
    """One official `train_one_epoch` iteration on random crops, as a callable returning the loss
    (float32 on the CPU: the official AmpScalerWrapper autocasts on CUDA only)."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    ref = official()
    torch.manual_seed(0)

    def network():
        return ref.MultiCropWrapper(
            ref.ViT(spec["global_size"], spec["patch"], spec["channels"], spec["width"],
                    spec["depth"], spec["num_heads"]),
            ref.MlpProjHead(spec["width"], spec["n_layers"], spec["hidden_dim"], spec["out_dim"],
                            use_bn=spec["use_bn"], last_bn=spec["last_bn"]))

    student = network()
    model = ref.StudentTeacherWrapper(student, network(), np.full(1 << 20, spec["momentum"]))
    optimizer = torch.optim.AdamW(ref.get_params_groups(student))
    columns = spec["batch_size"] * spec["num_target_crops"]
    loss_fn = ref.DistillBAMLoss(
        n_crops=spec["global_crops"] + spec["local_crops"], n_lrg_crops=spec["global_crops"],
        n_tgt_crops=spec["num_target_crops"], ot_reg=spec["sinkhorn_reg"],
        softmax_temperature=spec["temperature"], num_sinkhorn_iters=spec["sinkhorn_iters"],
        top_k=spec["top_k"] if spec["top_k"] < columns else 0)  # bam_jax: no mask if k >= columns
    images = [torch.randn(spec["batch_size"], spec["channels"], size, size)
              for count, size in ((spec["global_crops"], spec["global_size"]),
                                  (spec["local_crops"], spec["local_size"]))
              for _ in range(count)]

    def step() -> float:
        model.train()
        ref.update_lr_and_wd(optimizer, [spec["lr"]], [spec["weight_decay"]], 0)
        loss = loss_fn(*model(images))
        optimizer.zero_grad()
        loss.backward()
        if spec["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip_grad"])
        optimizer.step()
        return float(loss.detach())

    return step


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of `fn()`. The CPU seconds are this process's, all threads: on cores
    shared with other work they count what the step itself used, which the wall time does not."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


class TorchReference:
    """The official step in a child process that imports neither TensorFlow nor JAX, kept alive
    so the parent can time it in turns with its own step (each side idles while the other runs).

    The child builds the step, runs `warmup_steps`, then times `steps` steps per request.
    """

    def __init__(self, spec: dict, warmup_steps: int = 1):
        # Run as a file, not `-m bam_jax...`: the package's __init__ imports jax.
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), json.dumps(spec), str(warmup_steps)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            raise RuntimeError(f"the PyTorch reference process exited ({code}); its error is "
                               "above")
        return json.loads(line)

    def step_seconds(self, steps: int) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of each of `steps` official steps (see `timed`)."""
        self._process.stdin.write(f"{steps}\n")
        self._process.stdin.flush()
        reply = self._reply()
        return list(zip(reply["step_seconds"], reply["step_cpu_seconds"]))

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve(spec: dict, warmup_steps: int) -> None:
    """The child's side of `TorchReference`: one JSON line per request on stdout."""
    import torch  # noqa: PLC0415

    step = official_train_step(spec)
    losses = [step() for _ in range(warmup_steps)]
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "warmup_losses": losses}), flush=True)
    for line in sys.stdin:
        times = [timed(step) for _ in range(int(line))]
        print(json.dumps({"step_seconds": [t[0] for t in times],
                          "step_cpu_seconds": [t[1] for t in times]}), flush=True)


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]), int(sys.argv[2]))
