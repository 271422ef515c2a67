"""Parameter and multiply-accumulate (MAC) counters and an inference-latency timer, for model-size reporting."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_macs(m: _ConvNd, inp: torch.Tensor, out: torch.Tensor) -> int:
    kernel = math.prod(m.kernel_size)  # kh * kw, or the N-d equivalent
    if m.transposed:
        # Each input element scatters into out_channels/groups kernels.
        return inp.numel() * (m.out_channels // m.groups) * kernel
    return out.numel() * (m.in_channels // m.groups) * kernel


def _linear_macs(m: nn.Linear, inp: torch.Tensor, out: torch.Tensor) -> int:
    return out.numel() * m.in_features  # out.numel() = leading dims * out_features


_COUNTERS: dict[type, Callable[[nn.Module, torch.Tensor, torch.Tensor], int]] = {
    _ConvNd: _conv_macs,
    nn.Linear: _linear_macs,
}


def layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """One call's multiply-accumulates of a conv or linear layer (0 for any other module)."""
    return next((count(module, inp, out) for kind, count in _COUNTERS.items() if isinstance(module, kind)), 0)


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates for one sample of shape ``(C, H, W)``.

    Convention (as in most papers' "FLOPs" tables, which are really MACs): only
    convolutions (``out_elements * in_channels/groups * kh * kw``) and linear layers
    (``in_features * out_features`` per leading position) are counted. Biases,
    normalisation, activations, pooling and dropout are ignored. A module called twice
    is counted twice. Measured with forward hooks on one zero-input forward pass in eval
    mode (so BatchNorm accepts batch 1); each module's training flag is restored afterwards.
    """
    total = 0

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += layer_macs(module, args[0], out)

    modes = {m: m.training for m in model.modules()}
    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, tuple(_COUNTERS))
    ]
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else "cpu"
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return total


def measure_latency(model: nn.Module, input_shape: tuple[int, int, int], *, batch_size: int = 64,
                    warmup: int = 3, repeats: int = 10) -> float:
    """Inference time per image in milliseconds: the median over `repeats` timed eval-mode
    forward passes of one batch of `batch_size` inputs, after `warmup` untimed ones (which
    pay for lazy allocation and kernel selection), divided by the batch size.

    Measured on the model's device with the threads this process has (`torch.set_num_threads`),
    so it is comparable between models measured the same way on the same machine, not across
    machines. The input comes from a private generator, so the global random state (and with
    it training) is untouched; each module's training flag is restored afterwards.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch_size={batch_size} and repeats={repeats} must be >= 1, warmup={warmup} >= 0")
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    inputs = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    modes = {m: m.training for m in model.modules()}
    times = []
    try:
        model.eval()
        with torch.inference_mode():
            for i in range(warmup + repeats):
                sync()
                start = time.perf_counter()
                model(inputs)
                sync()  # a CUDA call returns before the kernels end
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        for m, training in modes.items():
            m.training = training
    return statistics.median(times) / batch_size * 1000.0
