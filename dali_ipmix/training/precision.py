"""Mixed precision as train.py and ``dali-ipmix bench``'s training rows use it (README "Training":
Precision and speed): ``--amp auto`` is bf16 on a GPU and off on the CPU; fp16 (with a grad
scaler) only on a GPU."""
from __future__ import annotations

from ..errors import UserError

AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_amp(amp: str, gpu: bool) -> str:
    if amp == "auto":
        return "bf16" if gpu else "off"
    if amp == "fp16" and not gpu:
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 or --amp off on CPU")
    return amp


def autocast(amp: str, device_type: str):
    import torch   # here: the flag's parsers (`dali-ipmix bench --help`) stay free of torch
    if amp in ("bf16", "fp16"):
        return torch.autocast(device_type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    return torch.autocast(device_type, enabled=False)
