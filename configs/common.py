"""Shared pieces of every pretraining config. Configs import nothing of bam_jax.

Every field can be overridden on the command line: `--config.loss.top_k=64`.
Batch sizes are global (summed over all processes and devices).
"""

import ml_collections


def data_config(**overrides) -> ml_collections.ConfigDict:
    """`config.data`: source and DINO-style multi-crop augmentation (official image_transforms)."""
    data = ml_collections.ConfigDict(dict(
        source="tfds",  # "mnist_bundled" | "tfds" | "folder"
        tfds_name="imagenet2012",
        # tfds data_dir, gs:// ok; None: the tfds default
        data_dir=ml_collections.FieldReference(None, field_type=str),
        folder="",  # root of <folder>/<split>/<class>/<image> for "folder"
        train_split="train",
        eval_train_split="train",  # the kNN bank / linear-probe training split
        eval_split="validation",  # "test" for mnist_bundled, "val" for an ImageNet folder
        global_crops_number=2,
        global_crop_size=224,
        global_crops_scale=(0.25, 1.0),
        local_crops_number=6,
        local_crop_size=96,
        local_crops_scale=(0.05, 0.25),
        flip_prob=0.5,
        color_jitter_prob=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        grayscale_prob=0.2,
        blur_probs=(1.0, 0.1, 0.5),  # first global crop, other global crops, local crops
        blur_sigma=(0.1, 2.0),
        solarize_prob=0.2,  # second (and later) global crops only
        resize_antialias=True,  # PIL-faithful bicubic; False: cheaper resizes, some aliasing
        # Pretraining: "on" ships uint8 crops and runs jitter, grayscale, blur, solarisation and
        # normalisation in the train step (bam_jax/photometric.py); "auto": on for GPU/TPU.
        augment_on_device="auto",  # "auto" | "on" | "off"
        eval_resize=256,
        eval_crop_size=224,
        # None: ImageNet's (its channel average for one-channel data)
        mean=ml_collections.FieldReference(None, field_type=tuple),
        std=ml_collections.FieldReference(None, field_type=tuple),
        shuffle_buffer=16_384,  # tfds only; in-memory sources shuffle each epoch exactly
        num_parallel_calls=-1,  # tf.data AUTOTUNE
        threadpool_size=0,  # private tf.data threadpool size; 0: TensorFlow's default
    ))
    data.update(overrides)
    return data


def model_config(**overrides) -> ml_collections.ConfigDict:
    """`config.model`: backbone + projector (official models/vit.py and models/heads.py)."""
    model = ml_collections.ConfigDict(dict(
        # "vit" | "caformer" | "convnet" | "pixels" (the raw-pixel baseline, no parameters)
        backbone="vit",
        vit_variant="small",  # "tiny" | "small" | "base" | "large" | "custom"
        # width, depth, num_heads: used when vit_variant="custom" (a preset fixes all three)
        width=384,
        depth=12,
        num_heads=12,
        patch_size=16,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        freeze_patch_embed=True,  # MoCo v3: a random, frozen patch projection
        remat=False,
        dtype="bfloat16",  # compute dtype; parameters stay float32
        param_dtype="float32",
        projector=ml_collections.ConfigDict(dict(
            n_layers=3, hidden_dim=4096, out_dim=4096, act="gelu",  # "gelu" | "relu"
            use_bn=False, last_bn=False,
            bias=True)),
        # CAFormer (official models/metaformer.py, built as utils.get_arch does). drop_path_rate
        # above applies to it too; qkv_bias, remat and the ViT fields do not.
        caformer=ml_collections.ConfigDict(dict(
            variant="m36",  # "s18" | "s36" | "m36" | "b36" | "custom"
            # used when variant="custom" (a preset fixes both): blocks and width per stage
            depths=(3, 12, 18, 3), dims=(96, 192, 384, 576),
            # The official BAM builder: GELU in the MLPs and SepConvs, no res-scales.
            # "starrelu" + res_scale=True: timm's original CAFormer (its ImageNet weights).
            act="gelu",  # "gelu" | "starrelu"
            res_scale=False,
            qkv_bias=False,  # the builder never passes --qkv_bias to a CAFormer
            remat_every=0,  # > 0: rematerialise each stage's blocks in groups of this many
        )),
        convnet=ml_collections.ConfigDict(dict(
            channels=(32, 64, 128, 256), strides=(1, 2, 2, 1),
            norm="batch")),  # "batch" | "group"
    ))
    model.update(overrides)
    return model


def base_config() -> ml_collections.ConfigDict:
    """The official ViT recipe (scripts/pretrain/vit_*.slurm) on ImageNet; configs edit it."""
    config = ml_collections.ConfigDict()
    config.seed = 1
    config.batch_size = 4096  # global
    config.num_epochs = 400
    config.num_train_steps = -1  # > 0 overrides num_epochs (e.g. a few steps of any config)
    config.data = data_config()
    config.model = model_config()
    config.loss = ml_collections.ConfigDict(dict(
        num_target_crops=2,
        sinkhorn_reg=0.05,  # eps
        sinkhorn_reg_final=0.05,
        sinkhorn_reg_ramp_epochs=30,  # linear eps ramp, then constant (official: 30 epochs)
        temperature=0.1,  # tau
        sinkhorn_iters=3,
        top_k=128,
        positive_masking=True,
    ))
    config.teacher = ml_collections.ConfigDict(dict(
        enabled=True, momentum=0.995, momentum_final=1.0))
    config.optimizer = ml_collections.ConfigDict(dict(
        name="adamw",  # "adamw" | "sgd" | "lars"
        base_lr=3e-4,  # scaled by batch_size / 256
        # As written in the official slurm scripts: min_lr is *not* scaled with the batch, so
        # with lr 3e-4 * 4096 / 256 = 4.8e-3 the cosine ends at 1e-3.
        min_lr=1e-3,
        warmup_epochs=40,
        weight_decay=0.04,
        weight_decay_final=0.4,
        clip_grad=0.3,  # global gradient norm; 0 disables
        b1=0.9,
        b2=0.999,
        momentum=0.9,  # sgd / lars
    ))
    config.mesh = mesh_config()
    config.knn = ml_collections.ConfigDict(dict(
        enabled=True, eval_at_start=False, every_epochs=16, k=20, temperature=0.07,
        train_fraction=0.1,  # official --knn_train_fraction: a class-balanced 10 % bank
        batch_size=1024))
    # ContrastiveCrop (official --use_ccrop, --loc_interval, --box_thresh, --ccrop_alpha,
    # --ccrop_img_size): boxes from the teacher's attention every loc_interval epochs after the
    # warmup; crops centred in them with Beta(alpha, alpha) from epoch max(loc, warmup) + 1.
    config.ccrop = ml_collections.ConfigDict(dict(
        enabled=True, loc_interval=40, box_thresh=0.1, alpha=0.6,
        image_size=0,  # the box pass's square image size; 0: data.global_crop_size (224)
        batch_size=1024,  # global batch of the box pass (official: 64 per GPU x 16 GPUs)
    ))
    # Fields a resume may change besides those that never alter the run (logging, mesh, kNN):
    # comma-separated names or prefixes, e.g. "num_epochs" to extend a finished run.
    config.allow_changed_fields = ""
    config.skip_nonfinite_steps = False  # False: stop on a non-finite loss; True: skip the step
    set_loop_fields(config, log_every_steps=50, checkpoint_every_steps=1000, keep_checkpoints=3)
    return config


def mesh_config() -> ml_collections.ConfigDict:
    """`config.mesh`: how the devices are used (pretraining and the linear probe)."""
    return ml_collections.ConfigDict(dict(
        num_devices=0,  # 0: all devices; n > 0: the first n (single process)
        fsdp=1,  # devices sharing each parameter; 1 = replicated (pure data parallel)
        fsdp_min_size=2**18,  # leaves smaller than this stay replicated
    ))


def set_loop_fields(config: ml_collections.ConfigDict, *, log_every_steps: int,
                    checkpoint_every_steps: int, keep_checkpoints: int) -> None:
    """The fields of the train loop that pretraining and the linear probe share."""
    config.log_every_steps = log_every_steps
    config.checkpoint_every_steps = checkpoint_every_steps
    config.keep_checkpoints = keep_checkpoints
    config.async_checkpointing = True
    # With several processes, how often they agree on stopping for a SIGTERM / Ctrl-C seen by
    # any of them (an all-gather of one flag).
    config.stop_check_every_steps = 10
