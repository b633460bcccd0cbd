"""Will a run fit in memory? A lower bound of what training needs, checked before anything is allocated.

    check_fits(config, batch_size=12, block_size=64, workers=2, device="cpu")   # or InsufficientMemoryError

The bound (float32, 4 bytes a number; N parameters, B·T tokens a micro-batch, L layers, C channels,
H heads, V vocabulary):

    weights 4N + AdamW's two moments 8N                          = 12 N bytes, all the time
      (other optimizers: 4N for at least one buffer, e.g. Muon's momentum, instead of 8N)
    + the larger of: all gradients 4N (at the optimizer step), or the activations kept for the
      backward, at least 4 · B·T · (L · (16 C + H·T) + 2 V) (GPT; bigram: 4 · B·T · 2 V) at the end
      of the forward (the backward frees them as the gradients appear)
    + 4N for each extra data-parallel worker's gradient block

16 C per token and layer counts the saved inputs of the layer norms, projections and GELU; H·T the
attention probabilities; 2 V the logits and their softmax. The real peak is higher (temporaries, the
allocator, Python), so a run this refuses could never have fit; tests/test_reliability.py measures the
real peak with tracemalloc.

Available memory: MemAvailable from /proc/meminfo, capped by a cgroup memory limit (v2 memory.max or v1
memory.limit_in_bytes, minus what the group already uses); os.sysconf elsewhere. Unknown: no check.
Only the host is checked: on CUDA the model is built on the host first (4N); the GPU is not checked.
"""
from __future__ import annotations

import os
from pathlib import Path

from tinygpt.models import ConfigError

__all__ = ["InsufficientMemoryError", "available_bytes", "parameter_count", "training_bytes", "check_fits"]

_GiB = float(1 << 30)


class InsufficientMemoryError(ConfigError):
    """The run's model, batch or block size cannot fit in the memory this machine has free."""


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_headroom() -> int | None:
    """limit - usage of this process's memory cgroup, or None when there is no limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:          # "no limit" (v1 writes a huge number)
            return None
        return max(int(limit) - usage, 0)
    return None


def available_bytes() -> int | None:
    """Memory this process may still allocate: the smaller of MemAvailable and the cgroup's headroom."""
    known = [b for b in (_meminfo_available(), _cgroup_headroom()) if b is not None]
    return min(known) if known else None


def parameter_count(config: dict) -> int:
    """The number of unique parameters of models.model_from_config(config), without building it."""
    V = int(config["vocab_size"])
    if config.get("model") == "bigram":
        return V * V
    C, T, L = int(config["n_embd"]), int(config["block_size"]), int(config["n_layer"])
    bias = bool(config.get("bias", True))
    qkv_bias = bias if config.get("qkv_bias") is None else bool(config["qkv_bias"])
    tie = bool(config.get("tie_weights", True))
    ln = C * (2 if bias and config.get("norm", "layernorm") == "layernorm" else 1)    # RMSNorm: no bias
    block = 2 * ln + 12 * C * C + (3 * C if qkv_bias else 0) + ((C + 4 * C + C) if bias else 0)
    head = 0 if tie else V * C + (V if bias else 0)
    wpe = 0 if config.get("rope", False) else T * C                                  # rope: no table
    return V * C + wpe + L * block + ln + head


def training_bytes(config: dict, batch_size: int, block_size: int, workers: int = 1,
                   optimizer: str = "adamw") -> dict[str, int]:
    """The lower bound of the module docstring, in parts: weights, gradients, optimizer, workers,
    activations, and their total."""
    N, V = parameter_count(config), int(config["vocab_size"])
    tokens = int(batch_size) * int(block_size)
    if config.get("model") == "bigram":
        per_token = 2 * V
    else:
        C, H, L = int(config["n_embd"]), int(config["n_head"]), int(config["n_layer"])
        per_token = L * (16 * C + H * int(block_size)) + 2 * V
    parts = {"weights": 4 * N, "gradients": 4 * N, "optimizer": (8 if optimizer == "adamw" else 4) * N,
             "workers": 4 * N * max(int(workers) - 1, 0), "activations": 4 * tokens * per_token}
    parts["total"] = (parts["weights"] + parts["optimizer"] + max(parts["gradients"], parts["activations"])
                      + parts["workers"])
    return parts


def check_fits(config: dict, batch_size: int, block_size: int, workers: int = 1, device: str = "cpu",
               available: int | None = None, optimizer: str = "adamw") -> None:
    """InsufficientMemoryError (one line, with the numbers) when the run cannot fit in `available` bytes
    (default: available_bytes()); on a device other than the CPU only the host copy of the weights counts."""
    available = available_bytes() if available is None else available
    if available is None:
        return
    parts = training_bytes(config, batch_size, block_size, workers, optimizer)
    need = parts["total"] if device == "cpu" else parts["weights"]
    if need <= available:
        return
    what = (f"weights and optimizer state {(parts['weights'] + parts['optimizer']) / _GiB:.2f} GiB, gradients "
            f"{parts['gradients'] / _GiB:.2f} GiB, activations for batch {batch_size} x block {block_size} "
            f"{parts['activations'] / _GiB:.2f} GiB, worker gradients {parts['workers'] / _GiB:.2f} GiB"
            if device == "cpu" else "the weights, built on the host first")
    raise InsufficientMemoryError(
        f"this run needs at least {need / _GiB:.2f} GiB of memory ({parameter_count(config):,} parameters; "
        f"{what}) but only {available / _GiB:.2f} GiB is available; use a smaller --batch-size, --block-size, "
        f"--n-embd or --n-layer (or fewer --workers)")
