"""`bam_jax.tools.benchmark_input`: the tf.data rate on generated JPEGs, and the torchvision side run in
a child process that never imports TensorFlow."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from bam_jax.tools import benchmark_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tf_rate_on_generated_jpegs(tmp_path):
    benchmark_input.write_jpegs(str(tmp_path), 8, "smooth")
    paths = sorted(tmp_path.glob("train/class*/*.jpg"))
    assert len(paths) == 8 and {p.parent.name for p in paths} == {f"class{i}" for i in range(4)}
    with Image.open(paths[0]) as image:
        pixels = np.asarray(image.convert("RGB"), np.float32)
    assert pixels.shape == (375, 500, 3)
    # "smooth": neighbouring pixels close, yet the picture is not flat.
    assert np.abs(np.diff(pixels, axis=1)).mean() < 20 and pixels.std() > 10
    start = time.perf_counter()
    rate, per_cpu, batch = benchmark_input.benchmark_tf(
        str(tmp_path), threads=1, batch=4, num_batches=2, antialias=True)
    elapsed = time.perf_counter() - start
    # 8 images timed (after 2 warm-up batches) within the call: at least 8 per whole call.
    assert rate >= 8 / elapsed and per_cpu > 0
    assert batch["global_crops"].shape == (4, 2, 224, 224, 3)
    # The host half of augment_on_device, and the device half timed on its batch.
    rate, per_cpu, batch = benchmark_input.benchmark_tf(
        str(tmp_path), threads=1, batch=4, num_batches=1, antialias=True, on_device=True)
    assert rate > 0 and per_cpu > 0 and batch["local_crops"].dtype == np.uint8
    backend, seconds, cpu_seconds, flops = benchmark_input.benchmark_device_stage(batch, 1)
    assert backend == "cpu" and seconds > 0 and cpu_seconds >= 0 and flops > 0


@pytest.mark.slow
def test_module_imports_no_tensorflow():
    # torchvision crashes when imported after TensorFlow, so its child process must stay clean.
    code = "import sys, bam_jax.tools.benchmark_input; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


# A stand-in for torchvision (not a test requirement): the few names benchmark_torchvision uses,
# doing real PIL/torch work, so the child's DataLoader loop and its rate are exercised.
_FAKE_TORCHVISION = {
    "torchvision/__init__.py": "from torchvision import datasets, transforms  # noqa\n",
    "torchvision/datasets.py": textwrap.dedent('''
        import os
        from PIL import Image

        class ImageFolder:
            def __init__(self, root, transform):
                self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
                self.transform = transform

            def __len__(self):
                return len(self.files)

            def __getitem__(self, i):
                with Image.open(self.files[i]) as image:
                    return self.transform(image.convert("RGB")), 0
        '''),
    "torchvision/transforms.py": textwrap.dedent('''
        import enum
        import numpy as np
        import torch

        class InterpolationMode(enum.Enum):
            BICUBIC = 3

        class Compose:
            def __init__(self, fns):
                self.fns = fns

            def __call__(self, x):
                for fn in self.fns:
                    x = fn(x)
                return x

        def Lambda(fn):
            return fn

        def _identity(*args, **kwargs):
            return lambda x: x

        RandomHorizontalFlip = ColorJitter = RandomGrayscale = _identity

        def RandomApply(fns, p):
            return Compose(fns)

        def RandomResizedCrop(size, scale, interpolation):
            return lambda image: image.resize((size, size), resample=interpolation.value)

        def ToTensor():
            return lambda image: torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)

        def Normalize(mean, std):
            mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
            return lambda x: (x - mean) / std
        '''),
}


@pytest.mark.slow
@pytest.mark.parametrize("torchvision", ["missing", "stand-in"])
def test_torchvision_side_runs_in_child(tmp_path, monkeypatch, torchvision):
    benchmark_input.write_jpegs(str(tmp_path / "data"), 4, "smooth")
    try:
        import torch  # noqa: F401
    except ImportError:
        torch = None
    try:
        import torchvision as _  # noqa: F401
        installed = True
    except ImportError:
        installed = False
    if torchvision == "stand-in":
        if torch is None or installed:
            pytest.skip("the stand-in needs torch, and is for where torchvision is missing")
        for name, text in _FAKE_TORCHVISION.items():
            (tmp_path / "fake" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "fake" / name).write_text(text)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            filter(None, [str(tmp_path / "fake"), ROOT, os.environ.get("PYTHONPATH")])))
    else:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get(
            "PYTHONPATH")])))
    start = time.perf_counter()
    rate = benchmark_input._torchvision_in_child(str(tmp_path / "data"), 1, 2, 1)
    elapsed = time.perf_counter() - start
    if torchvision == "missing" and not installed:
        assert rate is None
    else:  # 2 images timed within the child's run
        assert rate is not None and rate >= 2 / elapsed, rate
