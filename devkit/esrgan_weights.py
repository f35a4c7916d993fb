"""Real-ESRGAN weights in the layout the released `RealESRGAN_x4plus.pth` uses, for tests and the GPU check.

spandrel builds RRDBNet with its old-arch module names; the released checkpoints use basicsr's names under
`params_ema`. Writing random weights under basicsr's names exercises the same loading path a user's file
takes.
"""

from __future__ import annotations

import re
from typing import Any


def basicsr_keys(old: dict[str, Any]) -> dict[str, Any]:
    """spandrel's old-arch RRDBNet keys -> the basicsr names used in RealESRGAN_x4plus.pth."""
    fixed = {"model.0": "conv_first", "model.3": "conv_up1", "model.6": "conv_up2", "model.8": "conv_hr",
             "model.10": "conv_last"}
    new = {}
    for key, value in old.items():
        stem, kind = key.rsplit(".", 1)
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0", stem):
            name = f"body.{m[1]}.rdb{m[2]}.conv{m[3]}"
        elif re.fullmatch(r"model\.1\.sub\.\d+", stem):
            name = "conv_body"
        else:
            name = fixed[stem]
        new[f"{name}.{kind}"] = value
    return new
