"""Throughput of the multi-crop train pipeline: `python -m bam_jax.tools.benchmark_input`.

Writes `--num_images` synthetic 500x375 JPEGs (ImageNet's typical size) into a temporary
ImageNet-style folder, runs the folder source with the ViT-S/16 recipe (2x224 + 6x96 crops) on
`--threads` tf.data threads and prints images/s, in both modes of `config.data.augment_on_device`
by default (`--modes`), alternating: "host" is the whole augmentation on the host, "device" stops
the host after cropping, resizing and flipping (uint8 crops + parameters). It then times the
photometric stage that "device" leaves to the accelerator, jitted on JAX's default backend (the
CPU here, a GPU or TPU where there is one), on one of those batches. The default content is a smooth random field plus
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


def _data_config(root: str, threads: int, antialias: bool):
    from configs import common

    return common.data_config(resize_antialias=antialias, source="folder", folder=root,
                              threadpool_size=threads, num_parallel_calls=threads)


def benchmark_tf(
    root: str, threads: int, batch: int, num_batches: int, antialias: bool,
    on_device: bool = False,
) -> tuple[float, float, dict]:
    """(images per wall second, images per CPU second of this process, the last batch) of
    create_pretrain_dataset on the folder, after 2 warm-up batches; `on_device`: the host's
    half of `augment_on_device`. The second figure is the per-core rate, and stays meaningful
    when other processes share the cores."""
    from bam_jax.data import pipeline

    ds = pipeline.create_pretrain_dataset(
        _data_config(root, threads, antialias), global_batch_size=batch, seed=0,
        process_index=0, process_count=1, augment_on_device=on_device)
    it = ds.as_numpy_iterator()
    for _ in range(2):
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        last = next(it)
    images = num_batches * batch
    return (images / (time.perf_counter() - start),
            images / (time.process_time() - cpu_start), last)


def benchmark_device_stage(batch: dict, repeats: int) -> tuple[str, float, float, float]:
    """(backend, seconds, CPU seconds of this process, XLA's FLOPs) per image of the
    photometric stage that `augment_on_device` runs in the train step
    (`photometric.augment_batch`, jitted), on one host batch of uint8 crops and parameters,
    median of `repeats` after a compiled warm-up. On a CPU backend the CPU seconds are its cost
    in host cores; the FLOPs size it for any backend."""
    import jax

    from bam_jax import photometric
    from configs import common

    stage = jax.jit(photometric.augment_batch, static_argnums=1)
    policy = photometric.Policy.from_data_config(common.data_config())
    batch = jax.device_put(batch)
    cost = stage.lower(batch, policy).compile().cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
    jax.block_until_ready(stage(batch, policy))
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(stage(batch, policy))
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    images = len(batch["label"])
    return (jax.default_backend(), float(np.median(walls)) / images,
            float(np.median(cpus)) / images, flops / images)


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
    parser.add_argument("--modes", nargs="+", choices=["host", "device"],
                        default=["host", "device"],
                        help="augment_on_device off (host) / on (device); timed in turns")
    parser.add_argument("--stage_repeats", type=int, default=5,
                        help="timed runs of the on-device photometric stage (0: skip it)")
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
        per_core = {(m, t): [] for m in args.modes for t in args.threads}
        stage, device_batch = [], None
        # Rounds alternate the sides (and the modes), so that all see the same drift of a shared
        # machine.
        for _ in range(args.rounds):
            for threads in args.threads:
                for mode in args.modes:
                    rate, per_cpu, last = benchmark_tf(
                        root, threads, args.batch, args.num_batches, not args.no_antialias,
                        on_device=mode == "device")
                    per_core[mode, threads].append(per_cpu)
                    if mode == "device":
                        device_batch = last
                    else:
                        rates[threads].append(rate)
                    print(f"tf.data   threads={threads} {mode:6s}: {rate:7.1f} images/s, "
                          f"{per_cpu:6.1f} images per CPU-second; 2x224 + 6x96 crops, "
                          f"{args.content} JPEGs, antialias={not args.no_antialias}")
                if len(args.modes) == 2:
                    ratio = per_core["device", threads][-1] / per_core["host", threads][-1]
                    print(f"          threads={threads}: device mode makes {ratio:.2f}x the "
                          f"images per host CPU-second")
                if "host" not in args.modes:
                    continue
                if args.torchvision:
                    tv = _torchvision_in_child(root, threads, args.batch, args.num_batches)
                    if tv is None:
                        print("torchvision: not importable, skipped")
                        args.torchvision = False
                    else:
                        host_rate = rates[threads][-1]
                        ratios[threads].append(host_rate / tv)
                        print(f"torchvision threads={threads}: {tv:7.1f} images/s; tf.data "
                              f"(host mode) is {host_rate / tv:.2f}x")
            if device_batch is not None and args.stage_repeats:
                stage.append(benchmark_device_stage(device_batch, args.stage_repeats))
                backend, seconds, cpu_seconds, flops = stage[-1]
                print(f"photometric stage on {backend}: {1e3 * seconds:.2f} ms per image, "
                      f"{1e3 * cpu_seconds:.2f} CPU-ms per image, {flops / 1e6:.0f} MFLOP per "
                      f"image (XLA), batch {args.batch}")
        if args.rounds > 1:
            for threads in args.threads:
                line = f"median of {args.rounds} rounds, threads={threads}:"
                for mode in args.modes:
                    line += f" {mode} {np.median(per_core[mode, threads]):.1f}"
                line += " images per CPU-second"
                if len(args.modes) == 2:
                    ratio = np.median(np.divide(per_core["device", threads],
                                                per_core["host", threads]))
                    line += f" (device/host {ratio:.2f}x)"
                if rates[threads]:
                    line += f"; host mode {np.median(rates[threads]):.1f} images/s"
                if ratios[threads]:
                    line += f", {np.median(ratios[threads]):.2f}x torchvision"
                print(line)
            if stage:
                print(f"median photometric stage on {stage[0][0]}: "
                      f"{1e3 * np.median([s[1] for s in stage]):.2f} ms per image, "
                      f"{1e3 * np.median([s[2] for s in stage]):.2f} CPU-ms per image")

if __name__ == "__main__":
    main()
