"""Throughput of the multi-crop train pipeline: `python -m bam_jax.tools.benchmark_input`.

Writes `--num_images` synthetic 500x375 JPEGs (ImageNet's typical size) into a temporary
ImageNet-style folder, runs the folder source with the ViT-S/16 recipe (2x224 + 6x96 crops) on
`--threads` tf.data threads and prints images/s. The default content is a smooth random field plus
grain, which compresses like a photo (~60 KB); `--content noise` gives white noise, whose much
larger JPEGs are a worst case for decoding. `--torchvision` also times the official PIL-based
DataAugmentationDINO recipe on the same files and thread counts, when torch/torchvision are
importable, and prints the ratio.

torchvision runs in a child process that never imports TensorFlow: importing torchvision after
TensorFlow in one process crashes (seen with torchvision 0.29). This module therefore imports
TensorFlow only inside the functions that use it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_jpegs(root: str, num_images: int, content: str, seed: int = 0) -> None:
    """`num_images` 375x500 JPEGs spread over 4 classes under root/train/<class>/."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    for i in range(num_images):
        if content == "noise":
            pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        else:
            coarse = rng.uniform(0, 255, (1, 24, 32, 3)).astype(np.float32)
            field = tf.image.resize(coarse, [375, 500], method="bicubic")[0].numpy()
            field += rng.normal(0, 6, field.shape).astype(np.float32)
            pixels = np.clip(field, 0, 255).astype(np.uint8)
        class_dir = os.path.join(root, "train", f"class{i % 4}")
        os.makedirs(class_dir, exist_ok=True)
        tf.io.write_file(os.path.join(class_dir, f"{i:05d}.jpg"),
                         tf.io.encode_jpeg(pixels, quality=90))


def benchmark_tf(
    root: str, threads: int, batch: int, num_batches: int, antialias: bool
) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) of
    create_pretrain_dataset on the folder, after 2 warm-up batches. The second figure is the
    per-core rate, and stays meaningful when other processes share the cores."""
    from bam_jax.data import pipeline
    from configs import common

    config = common.data_config(resize_antialias=antialias, source="folder", folder=root,
                                threadpool_size=threads, num_parallel_calls=threads)
    ds = pipeline.create_pretrain_dataset(
        config, global_batch_size=batch, seed=0, process_index=0, process_count=1)
    it = ds.as_numpy_iterator()
    for _ in range(2):
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(it)
    images = num_batches * batch
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def benchmark_torchvision(root: str, threads: int, batch: int, num_batches: int) -> float | None:
    """Images/s of the official PIL/torchvision recipe in a DataLoader with `threads` workers,
    or None without torch. Call it in a process without TensorFlow (see the module docstring)."""
    try:
        import torch
        from PIL import ImageFilter, ImageOps
        from torchvision import datasets, transforms
    except ImportError:
        return None
    import random

    def maybe(prob, fn):
        return transforms.Lambda(lambda img: fn(img) if random.random() < prob else img)

    def blur(prob):
        return maybe(prob, lambda img: img.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0))))

    common = [
        transforms.RandomHorizontalFlip(0.5),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(0.2),
    ]
    norm = [transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    bicubic = transforms.InterpolationMode.BICUBIC

    def rrc(size, scale):
        return transforms.RandomResizedCrop(size, scale=scale, interpolation=bicubic)

    g1 = transforms.Compose([rrc(224, (0.25, 1.0)), *common, blur(1.0), *norm])
    g2 = transforms.Compose([rrc(224, (0.25, 1.0)), *common, blur(0.1),
                             maybe(0.2, ImageOps.solarize), *norm])
    loc = transforms.Compose([rrc(96, (0.05, 0.25)), *common, blur(0.5), *norm])
    views = lambda img: [g1(img), g2(img)] + [loc(img) for _ in range(6)]  # noqa: E731
    data = datasets.ImageFolder(os.path.join(root, "train"), transform=views)
    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=threads,
                                         shuffle=True, drop_last=True, persistent_workers=True)
    seen, start = 0, None
    while seen < (num_batches + 2) * batch:
        for _ in loader:
            seen += batch
            if seen == 2 * batch:
                start = time.perf_counter()
            if seen >= (num_batches + 2) * batch:
                break
    return num_batches * batch / (time.perf_counter() - start)


def _torchvision_in_child(root: str, threads: int, batch: int, num_batches: int) -> float | None:
    """`benchmark_torchvision` in a fresh interpreter that has not imported TensorFlow."""
    code = ("import sys; from bam_jax.tools.benchmark_input import benchmark_torchvision as b; "
            "print(b(sys.argv[1], *map(int, sys.argv[2:])))")
    out = subprocess.run([sys.executable, "-c", code, root, str(threads), str(batch),
                          str(num_batches)], check=True, capture_output=True, text=True).stdout
    last = out.strip().splitlines()[-1]
    return None if last == "None" else float(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--num_batches", type=int, default=16, help="timed batches per run")
    parser.add_argument("--content", choices=["smooth", "noise"], default="smooth")
    parser.add_argument("--no_antialias", action="store_true",
                        help="config.data.resize_antialias=False (faster, less PIL-faithful)")
    parser.add_argument("--torchvision", action="store_true")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat and print medians (ratios are taken within each round)")
    args = parser.parse_args()
    # Before any TensorFlow op runs: importing the pipeline sets TensorFlow's thread pools.
    from bam_jax.data import pipeline  # noqa: F401

    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, args.num_images, args.content)
        rates = {t: [] for t in args.threads}
        ratios = {t: [] for t in args.threads}
        # Rounds alternate the two sides, so that both see the same drift of a shared machine.
        for _ in range(args.rounds):
            for threads in args.threads:
                rate, per_cpu = benchmark_tf(
                    root, threads, args.batch, args.num_batches, not args.no_antialias)
                rates[threads].append(rate)
                print(f"tf.data   threads={threads}: {rate:7.1f} images/s, {per_cpu:6.1f} images "
                      f"per CPU-second; 2x224 + 6x96 crops, {args.content} JPEGs, "
                      f"antialias={not args.no_antialias}")
                if args.torchvision:
                    tv = _torchvision_in_child(root, threads, args.batch, args.num_batches)
                    if tv is None:
                        print("torchvision: not importable, skipped")
                        args.torchvision = False
                    else:
                        ratios[threads].append(rate / tv)
                        print(f"torchvision threads={threads}: {tv:7.1f} images/s; tf.data is "
                              f"{rate / tv:.2f}x")
        if args.rounds > 1:
            for threads in args.threads:
                line = f"median of {args.rounds} rounds, threads={threads}: tf.data " \
                       f"{np.median(rates[threads]):.1f} images/s"
                if ratios[threads]:
                    line += f", {np.median(ratios[threads]):.2f}x torchvision"
                print(line)

if __name__ == "__main__":
    main()
