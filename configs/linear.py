"""Linear probe of a BAM backbone on ImageNet: the official scripts/linear/linear.slurm (ViT-B).

python -m bam_jax.evals.linear_probe --config=configs/linear.py --workdir=gs://BUCKET/bam_vit_b_linear \
    --config.pretrained_workdir=gs://BUCKET/bam_vit_b --config.data.data_dir=gs://BUCKET/tfds

The frozen backbone comes from the newest checkpoint of `pretrained_workdir`, rebuilt from that
run's config.json; for ViT-S the official eval_linear.py advises n_last_blocks=4, avgpool=False.
"""

import ml_collections

from configs import common, vit_b


def get_config():
    config = ml_collections.ConfigDict()
    config.pretrained_workdir = ""  # a `python -m bam_jax.main --workdir`; "" needs random_init
    config.use_teacher = True  # official --use_teacher true; False: the student's weights
    config.random_init = False  # True: the backbone at init (the baseline row), no checkpoint
    # The pretraining config of the random-init backbone; ignored (replaced by DIR/config.json)
    # when pretrained_workdir is set.
    config.pretrain = vit_b.get_config()
    config.seed = 1
    config.batch_size = 1024  # global: official 128 per GPU x 8 GPUs
    config.eval_batch_size = 1024
    config.num_epochs = 100
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.num_classes = 1000  # official --num_labels; 10 for MNIST
    config.n_last_blocks = 1  # CLS tokens of the last n blocks (ViT only)
    config.avgpool = True  # also the mean patch token of the last block (ViT only)
    config.bn_head = True  # non-affine BatchNorm (eps 1e-6) before the linear layer
    config.backbone_dtype = "float32"  # the official probe runs the backbone without autocast
    # Official: SGD momentum 0.9, lr 0.002 x batch/256, no weight decay, cosine to 0 (per epoch
    # there, per step here). Field names are those train.make_optimizer reads.
    config.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", base_lr=0.002, min_lr=0.0, warmup_epochs=0, weight_decay=0.0, clip_grad=0.0,
        momentum=0.9, b1=0.9, b2=0.999))
    # Train view: RandomResizedCrop(global_crop_size, global_crops_scale) + flip(flip_prob), as
    # torchvision's RandomResizedCrop(224) (bicubic here, bilinear there); the other multi-crop
    # and colour fields are not used. Eval view: resize eval_resize, centre crop eval_crop_size.
    config.data = common.data_config(
        eval_train_split="train", eval_split="validation", global_crop_size=224,
        global_crops_scale=(0.08, 1.0), flip_prob=0.5, eval_resize=256, eval_crop_size=224)
    config.mesh = common.mesh_config()
    config.eval_every_epochs = 1  # official --val_freq 1
    common.set_loop_fields(config, log_every_steps=100, checkpoint_every_steps=1000,
                           keep_checkpoints=2)
    return config
