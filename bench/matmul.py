"""The machine's achievable matrix-multiply rate, measured with the run's threads, device and dtype."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import benchmark

CPU_SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (522, 768, 3072), (522, 3072, 768)]
CUDA_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (522, 768, 3072)]


def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, min_run_time: float = 0.5) -> dict[str, Any]:
    """GFLOP/s of `a @ b` per shape (m, k, n), from the median time of `torch.utils.benchmark`'s
    `blocked_autorange` over at least `min_run_time` seconds per shape (CUDA is synchronised by the timer).

    The achievable rate is the best shape's. The last two CPU shapes are GPT-2-small's MLP matmuls for one segment
    (512 tokens + 10 memory tokens)."""
    shapes = CUDA_SHAPES if device.startswith("cuda") else CPU_SHAPES
    per_shape = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        timer = benchmark.Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
        per_shape[f"{m}x{k}x{n}"] = 2 * m * k * n / timer.blocked_autorange(min_run_time=min_run_time).median / 1e9
    best = max(per_shape, key=per_shape.get)
    return {"gflops": per_shape[best], "best_shape": best, "per_shape_gflops": per_shape, "min_run_time": min_run_time,
            "threads": torch.get_num_threads(), "device": device, "dtype": str(dtype).removeprefix("torch.")}
