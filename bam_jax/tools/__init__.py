"""Tools around a run: weight conversion (timm / safetensors) and benchmarks."""
