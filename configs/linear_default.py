"""Linear probe of the embedded default (configs/default.py, bundled MNIST): a minute on a CPU.

python -m bam_jax.evals.linear_probe --config=configs/linear_default.py \
    --config.pretrained_workdir=workdirs/default --workdir=workdirs/default_linear
python -m bam_jax.evals.linear_probe --config=configs/linear_default.py --config.random_init=True \
    --workdir=workdirs/random_linear
"""

from configs import default, linear


def get_config():
    config = linear.get_config()
    config.pretrain = default.get_config()
    config.seed = 0
    config.batch_size = 256
    config.eval_batch_size = 200  # the 1,000 test digits in 5 batches
    config.num_epochs = 5
    config.num_classes = 10
    # 5 short epochs instead of 100: a larger lr than the official 0.002 (x batch/256).
    config.optimizer.base_lr = 0.1
    pretrain_data = config.pretrain.data
    config.data = pretrain_data.copy_and_resolve_references()
    # One protocol for every row (pixels, random init, BAM): the whole digit, unaugmented (a crop
    # at scale 1 of a square image is the image). Random-resized crops move a digit around, which
    # a linear map of raw pixels cannot follow, so they under-train the pixel baseline.
    config.data.update(global_crops_scale=(1.0, 1.0), flip_prob=0.0)
    config.log_every_steps = 5
    config.checkpoint_every_steps = 50
    return config
