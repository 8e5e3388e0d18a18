"""What ran the benchmark: the machine, the library versions, and its measured matmul peak."""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from jaxlight.report import library_versions

__all__ = ["describe", "versions", "matmul_peak", "hardware_slug"]


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> dict:
    """``{"backend", "device", "cpu", "cores", "platform"}`` for the JSON and the table header."""
    import jax

    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def hardware_slug(info: dict) -> str:
    """A folder name for ``benchmarks/results/<hardware>/``: ``cpu-2core-amd-epyc``, ``gpu-h100``."""
    if info["backend"] == "cpu":
        name = f"cpu-{info['cores']}core-{info['cpu']}"
    else:
        name = f"{info['backend']}-{info['device']}"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def versions() -> dict:
    return library_versions("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "lightning", "numpy")


def _best_rate(fn, flops: float, repeats: int) -> float:
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
    """Measured float32 matmul throughput (FLOP/s) of square products in JAX and in torch.

    The best of ``repeats`` timed, synchronised products at sizes ``n // 4``, ``n // 2`` and
    ``n``: the ceiling a training step's matmuls could reach on this machine today.
    ``peak_flops`` is the largest rate seen. On a shared machine this is a snapshot of the
    load: ``run`` measures it at the start and the end and keeps the larger.
    """
    rates = [_matmul_peak_at(size, repeats) for size in (n // 4, n // 2, n)]
    best = max(rates, key=lambda r: r["peak_flops"])
    return {**best, "by_size": rates}


def _matmul_peak_at(n: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3
    a = jax.device_put(a_np)
    mm = jax.jit(lambda a: a @ a)
    jax_rate = _best_rate(lambda: mm(a).block_until_ready(), flops, repeats)
    cuda = torch.cuda.is_available()
    t = torch.from_numpy(a_np).to("cuda" if cuda else "cpu")

    def torch_mm():
        torch.mm(t, t)
        if cuda:
            torch.cuda.synchronize()

    torch_rate = _best_rate(torch_mm, flops, repeats)
    return {"n": n, "jax_flops": jax_rate, "torch_flops": torch_rate, "peak_flops": max(jax_rate, torch_rate)}
