"""Calibration algorithms behind one API: GPTQ, AWQ and SmoothQuant learn from calibration
batches (`quantize_(model, GPTQ(base), calibration=batches)`); HQQ needs no data."""

from lowbit.quantize.calibration import hqq  # noqa: F401 - registers the HQQ handler
from lowbit.quantize.calibration.api import (
    AWQ,
    GPTQ,
    HQQ,
    CalibratedConfig,
    IntTarget,
    SmoothQuant,
    calibrate,
    int_target,
    needs_calibration,
)

__all__ = [
    "AWQ",
    "GPTQ",
    "HQQ",
    "CalibratedConfig",
    "IntTarget",
    "SmoothQuant",
    "calibrate",
    "int_target",
    "needs_calibration",
]
