"""The machine's achievable matrix-multiply rate, measured with the run's threads, device and dtype."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

CPU_SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (522, 768, 3072), (522, 3072, 768)]
CUDA_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (522, 768, 3072)]


def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 10,
                min_seconds: float = 0.05) -> dict[str, Any]:
    """GFLOP/s of `a @ b` per shape (m, k, n): median over `repeats` timings, each looping until `min_seconds`.

    The achievable rate is the best shape's median. The last two CPU shapes are GPT-2-small's MLP matmuls for one
    segment (512 tokens + 10 memory tokens)."""
    shapes = CUDA_SHAPES if device.startswith("cuda") else CPU_SHAPES
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    per_shape = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b  # warm-up
        flops = 2 * m * k * n
        rates = []
        for _ in range(repeats):
            iters, elapsed = 0, 0.0
            sync()
            start = time.perf_counter()
            while elapsed < min_seconds:
                a @ b
                iters += 1
                sync()
                elapsed = time.perf_counter() - start
            rates.append(flops * iters / elapsed / 1e9)
        per_shape[f"{m}x{k}x{n}"] = statistics.median(rates)
    best = max(per_shape, key=per_shape.get)
    return {"gflops": per_shape[best], "best_shape": best, "per_shape_gflops": per_shape, "repeats": repeats,
            "threads": torch.get_num_threads(), "device": device, "dtype": str(dtype).removeprefix("torch.")}
