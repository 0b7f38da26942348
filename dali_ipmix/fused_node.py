"""The fused backend as one DALI node: ``fused_ipmix_node`` computes every IPMix view of a batch
with ``dali_ipmix.fused`` (Triton on the GPU, eager torch on the CPU) inside a pipeline graph.

DALI has no public operator that hands a Python function whole dense batches as single DLPack
tensors (and, on the GPU, its CUDA stream): ``dl_tensor_python_function`` hands over one capsule per
sample.  The operator behind ``nvidia.dali.plugin.jax.fn.jax_function`` (``_JaxFunction``) does,
and it is private: ``batch_function`` is the one place that uses it, for the DALI versions it was
tested with (``TESTED_DALI``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import config as C
from .errors import UserError
from .fused import checked_impl, default_impl, ipmix_views_from_uniforms

TESTED_DALI = (2, 4)        # major, minor: DALI 2.4.x (constraints.txt pins nvidia-dali-cuda120)

_BATCH_FUNCTION = None


def check_dali_version(version: str) -> None:
    """Refuse, in one line saying what to install, a DALI outside the tested range: the private
    operator's name, arguments and calling convention are not promised across releases."""
    try:
        major_minor = tuple(int(v) for v in version.split(".")[:2])
    except ValueError:
        major_minor = None
    if major_minor != TESTED_DALI:
        want = ".".join(map(str, TESTED_DALI))
        raise UserError(f"the fused backend uses DALI's private _JaxFunction operator, tested with "
                        f"DALI {want}.x only, and this is DALI {version}: install "
                        f"'nvidia-dali-cuda120=={want}.*' (or use --backend dali)")


def batch_function():
    """DALI's batch-level Python operator class: whole dense batches in and out as single DLPack
    tensors, and on GPU the callback is given DALI's CUDA stream (see the module's docstring)."""
    global _BATCH_FUNCTION
    if _BATCH_FUNCTION is None:
        import nvidia.dali
        check_dali_version(nvidia.dali.__version__)
        import nvidia.dali.python_function_plugin  # noqa: F401  (registers the operator)
        from nvidia.dali import ops

        class BatchFunction(ops.python_op_factory("_JaxFunction", "_JaxFunction", "_JaxFunction",
                                                  generated=False)):
            _impl_module = __name__
            ops.register_cpu_op("_JaxFunction")
            ops.register_gpu_op("_JaxFunction")

            def __init__(self, function, device="cpu", **kwargs):
                self.function = function
                super().__init__(function_id=id(function), device=device, **kwargs)

        _BATCH_FUNCTION = BatchFunction
    return _BATCH_FUNCTION


class _NodeCallback:
    """Called by DALI once per batch: images, mixing pictures and uniforms in; views and tapes
    out.  On GPU everything is enqueued on DALI's own stream, so nothing is synchronised."""

    def __init__(self, cfg, out_dtype, channels_last_out, impl, gpu):
        self.cfg, self.out_dtype, self.channels_last_out = cfg, out_dtype, channels_last_out
        self.impl, self.gpu = impl, gpu

    def _compute(self, x, f, u):
        return ipmix_views_from_uniforms(x, f, u, self.cfg, self.out_dtype,
                                         self.channels_last_out, self.impl)

    def __call__(self, *args):
        if not self.gpu:
            x, f, u = (torch.from_dlpack(t.__dlpack__(None)) for t in args)
            return tuple(o.__dlpack__() for o in self._compute(x, f, u))
        stream, *inputs = args
        device = torch.device("cuda", torch.cuda.current_device())
        on_dali = torch.cuda.ExternalStream(stream, device=device) if stream else \
            torch.cuda.current_stream(device)
        with torch.cuda.device(device), torch.cuda.stream(on_dali):
            x, f, u = (torch.from_dlpack(t.__dlpack__(stream)) for t in inputs)
            return tuple(o.__dlpack__(stream=stream) for o in self._compute(x, f, u))


def fused_ipmix_node(images, pictures, uniforms, cfg: C.IPMixConfig, device: str = "gpu",
                     out_dtype: torch.dtype = torch.float32, channels_last_out: bool = False,
                     impl: Optional[str] = None):
    """Inside a ``@pipeline_def``: all IPMix views of every sample, computed by the fused backend.

    images, pictures: uint8 HWC DataNodes of one uniform size S x S; uniforms: the raw draws,
    ``tape.dali_uniforms(cfg, cfg.n_aug)`` ([A, U] per sample).  ``device`` "cpu" or "gpu": where
    the work runs (CPU inputs are moved there).  ``impl``: "triton" or "torch" (default
    ``default_impl``: Triton on GPU, eager torch on the CPU).  Returns (views, tapes): views
    [V, 3, S, S] per sample (layout "FCHW", the views as frames; [V, S, S, 3] "FHWC" with
    ``channels_last_out``), tapes [A, L] (the decoded records, for replay).

    One operator call per batch, on dense batch tensors (no per-sample Python); on GPU the
    kernels run on DALI's stream.  Works with the default executor (async, pipelined, dynamic);
    like every Python operator it cannot be serialized.
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu":
        images, pictures, uniforms = images.gpu(), pictures.gpu(), uniforms.gpu()
    elif "gpu" in (images.device, pictures.device, uniforms.device):
        raise ValueError("device='cpu' needs CPU images, pictures and uniforms")
    impl = checked_impl(impl or default_impl("cuda" if device == "gpu" else "cpu"))
    layout = "FHWC" if channels_last_out else "FCHW"
    op = batch_function()(_NodeCallback(cfg, out_dtype, channels_last_out, impl, device == "gpu"),
                          device=device, num_outputs=2, output_layouts=[layout, ""],
                          preserve=True)
    views, tapes = op(images, pictures, uniforms)
    return views, tapes
