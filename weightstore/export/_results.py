"""Result and report types of an export: what was written, and what verification found.

All frozen and JSON-able through ``to_dict`` so the job runner can store them with the job and the
UI can show them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


@dataclass(frozen=True)
class TensorDelta:
    """How one adapted output tensor changed (measured in the merge loop, in fp32)."""

    name: str
    """Output tensor name."""
    changed: bool
    """Whether any element differs from the base after casting back to the base dtype."""
    delta_norm: float
    """Frobenius norm of the intended delta ``scale * B @ A`` (all ops on this tensor)."""
    lost_norm: float
    """Norm of the part of the delta that casting to the base dtype rounded away."""

    @property
    def lost_fraction(self) -> float:
        """``lost_norm / delta_norm`` (0 when the delta is zero)."""
        return self.lost_norm / self.delta_norm if self.delta_norm > 0 else 0.0


@dataclass(frozen=True)
class NoOpGuard:
    """The no-op guard: adapted tensors must differ from the base unless the adapter is zero."""

    passed: bool
    """False when a non-zero adapter produced output equal to the base."""
    adapter_is_zero: bool
    """Every LoRA delta is exactly zero (then an export equal to the base is correct)."""
    adapted_tensors: int
    """Output tensors that received a delta."""
    unchanged_tensors: tuple[str, ...]
    """Adapted tensors with a non-zero delta that came out bit-identical to the base."""
    rounding_loss: float
    """Fraction of the total delta norm lost to rounding into the base dtype (``sqrt(sum lost^2 / sum delta^2)``)."""
    rounding_warn_fraction: float
    """Threshold above which the loss is reported as a warning."""
    rounding_warned: tuple[str, ...]
    """Tensors whose own lost fraction exceeds the threshold."""


@dataclass(frozen=True)
class RecomputeCheck:
    """Sampled output tensors re-read from disk and recomputed by an independent code path."""

    passed: bool
    """All sampled values within tolerance and all sampled untouched tensors byte-identical."""
    tensors: tuple[str, ...]
    """Adapted tensors sampled."""
    untouched_checked: tuple[str, ...]
    """Untouched tensors compared byte for byte with the base."""
    max_abs_error: float
    """Largest absolute difference between written and recomputed values."""
    worst_ratio: float
    """Largest ``error / allowed error`` over sampled elements (must be <= 1)."""
    tolerance: str
    """How the allowed error is defined."""
    detail: str = ""
    """What failed, when something did."""


@dataclass(frozen=True)
class ForwardCheck:
    """A forward pass comparing the exported model's logits with base + adapter logits."""

    ran: bool
    """False when skipped (model above the size threshold, or disabled)."""
    passed: bool
    """Logits within tolerance (True when skipped)."""
    reason: str
    """Why it was skipped, or what was compared."""
    max_abs_diff: float = 0.0
    """``max |exported - reference|`` over all logits."""
    tolerance: float = 0.0
    """The allowed ``max_abs_diff``."""
    adapter_effect: float = 0.0
    """``max |reference - base|``: how much the adapter moves the logits (the check's signal)."""
    tokens: int = 0
    """Number of token positions compared."""


@dataclass(frozen=True)
class VerificationReport:
    """Everything verification checked for one export."""

    noop: NoOpGuard
    """No-op and rounding guard."""
    recompute: RecomputeCheck
    """Sampled recomputation."""
    forward: ForwardCheck
    """Forward-pass logits comparison."""
    warnings: tuple[str, ...]
    """Non-fatal findings for the user (rounding loss, weak forward signal, ...)."""

    @property
    def passed(self) -> bool:
        return self.noop.passed and self.recompute.passed and self.forward.passed

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = _jsonable(self)  # a dataclass always becomes a dict
        out["passed"] = self.passed
        return out


@dataclass(frozen=True)
class OutputFile:
    """One file of the export's output directory."""

    path: str
    """Path relative to the output directory."""
    size: int
    """Size in bytes."""


@dataclass(frozen=True)
class ExportResult:
    """A finished, verified export."""

    to: str
    """``peft`` or ``merged``."""
    family: str
    """Model family profile used."""
    out_dir: Path
    """The output directory (renamed into place only after verification passed)."""
    files: tuple[OutputFile, ...]
    """Every output file, sorted by path."""
    bytes_written: int
    """Total size of the output files."""
    seconds: float
    """Wall time of the export including verification."""
    write_seconds: float
    """Wall time of writing the output (excluding planning and verification)."""
    plan: dict[str, Any]
    """The plan's summary."""
    verification: VerificationReport
    """What verification checked and found."""

    @property
    def throughput_mb_s(self) -> float:
        """Output MB (10^6 bytes) per second of writing."""
        return self.bytes_written / 1e6 / self.write_seconds if self.write_seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = _jsonable(self)  # a dataclass always becomes a dict
        out["verification"] = self.verification.to_dict()
        out["throughput_mb_s"] = round(self.throughput_mb_s, 1)
        return out
