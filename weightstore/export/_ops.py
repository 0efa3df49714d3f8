"""The vocabulary of an export plan: where a LoRA delta lands, and how a PEFT tensor is assembled.

Every family, however its experts are laid out, reduces to the same two primitives:

- :class:`MergeOp` -- add ``scale * B @ A`` (a 2-D delta in ``(out, in)`` orientation) into a strided
  row range of one 2-D view of a base tensor: the whole tensor (dense), one expert's slab of a 3-D
  tensor, possibly transposed (``(in, out)`` storage, GPT-OSS), possibly every other row
  (interleaved gate/up, GPT-OSS) or a half (concatenated gate/up, Qwen3-MoE fused).
- :class:`PeftBlock` -- copy one 2-D LoRA factor (or one expert's slice of it) into a strided block
  of a PEFT tensor (a plain copy for dense modules; block-diagonal, expert-interleaved layouts for
  PEFT's ``target_parameters`` on fused 3-D experts).

Keeping the primitives this small is what lets one merge loop, one PEFT writer and one verifier
serve every family; the families only decide *which* primitives to emit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rows:
    """A strided index range ``start, start + step, ..., start + step * (count - 1)``."""

    start: int
    """First index."""
    step: int
    """Stride (1 = contiguous, 2 = interleaved)."""
    count: int
    """Number of indices."""

    @classmethod
    def all(cls, n: int) -> Rows:
        return cls(0, 1, n)

    @property
    def slice(self) -> slice:
        return slice(self.start, self.start + self.step * (self.count - 1) + 1, self.step)

    @property
    def stop(self) -> int:
        """One past the last index."""
        return self.start + self.step * (self.count - 1) + 1

    def indices(self) -> range:
        return range(self.start, self.stop, self.step)


@dataclass(frozen=True)
class FactorRef:
    """One LoRA factor as a 2-D matrix: an adapter tensor, or one expert's slice of a 3-D one."""

    key: str
    """Full adapter key (``base_model.model....lora_A.weight``)."""
    index: int | None
    """Index into dim 0 of a 3-D factor (0 for a shared, broadcast size-1 dim); None for 2-D."""


@dataclass(frozen=True)
class MergeOp:
    """Add ``scale * B @ A`` into rows ``rows`` of one 2-D ``(out, in)`` view of a base tensor."""

    module: str
    """The Tinker module this delta comes from (for messages and reports)."""
    a: FactorRef
    """``lora_A`` as ``(r, in)``."""
    b: FactorRef
    """``lora_B`` as ``(rows.count, r)``."""
    expert: int | None
    """Index into dim 0 of a 3-D target; None when the target is 2-D."""
    transposed: bool
    """The target (or expert slab) stores the weight as ``(in, out)``; the delta is added transposed."""
    rows: Rows
    """Which rows of the ``(out, in)`` view receive the delta."""


@dataclass(frozen=True)
class PeftBlock:
    """Copy ``source`` (2-D, optionally transposed) into ``dest[rows, cols]`` of a PEFT tensor."""

    source: FactorRef
    """The adapter factor (or expert slice) to copy."""
    rows: Rows
    """Destination rows."""
    cols: Rows
    """Destination columns."""
