"""Convert raw Tinker LoRA checkpoints into PEFT adapters or merged Hugging Face models.

Local directories in, a local directory out; no server, catalog or object store involved (the
export job runner downloads inputs, calls this, and uploads the result)::

    from weightstore.export import export_merged, export_peft, plan_export

    plan = plan_export("ckpt/", "Qwen3-8B/", to="merged")    # header-only; raises on any mismatch
    print(plan.summary())
    result = export_merged("ckpt/", "Qwen3-8B/", "out/")     # streamed, verified, atomic
    result.verification.to_dict()                             # store with the job

Every export is planned first (all shapes checked, every adapter key accounted for), written into
a hidden temporary directory next to ``out_dir``, verified there, and only then renamed into place;
on any failure the temporary directory is removed and nothing is left at ``out_dir``.

Model families are explicit profiles (:func:`known_families`): Llama/Mistral, Qwen2/Qwen3 dense,
Qwen3-MoE, GPT-OSS. Errors are :mod:`weightstore.errors` types: ``InvalidFormat`` (malformed
inputs), ``IntegrityError`` (sha256 mismatch), ``InvalidRequest`` (adapter and base do not fit,
unsupported family), ``AlreadyExists`` (``out_dir`` exists), ``ExportFailed`` (I/O failure while
writing) and ``VerificationFailed`` (the output did not pass its checks).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from weightstore.errors import AlreadyExists, ExportFailed, InvalidRequest, WeightstoreError
from weightstore.export._merge import write_merged
from weightstore.export._peft import write_peft
from weightstore.export._plan import DEFAULT_SHARD_BYTES, ExportPlan, ExportTarget, plan_export
from weightstore.export._registry import FamilyInfo, known_families
from weightstore.export._results import (
    ExportResult,
    ForwardCheck,
    NoOpGuard,
    OutputFile,
    RecomputeCheck,
    TensorDelta,
    VerificationReport,
)
from weightstore.export._verify import (
    DEFAULT_FORWARD_MAX_BYTES,
    DEFAULT_ROUNDING_WARN_FRACTION,
    DEFAULT_SAMPLES,
    verify,
)

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "ExportPlan",
    "ExportResult",
    "ExportTarget",
    "FamilyInfo",
    "ForwardCheck",
    "NoOpGuard",
    "OutputFile",
    "RecomputeCheck",
    "TensorDelta",
    "VerificationReport",
    "VerifyOptions",
    "export_merged",
    "export_peft",
    "known_families",
    "plan_export",
    "verify_export",
]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class VerifyOptions:
    """Knobs of the verification every export runs."""

    samples: int = DEFAULT_SAMPLES
    """Adapted (and untouched) tensors re-read and recomputed."""
    forward_max_bytes: int = DEFAULT_FORWARD_MAX_BYTES
    """Run the forward-pass check when the base weights are at most this many bytes (0 disables it)."""
    rounding_warn_fraction: float = DEFAULT_ROUNDING_WARN_FRACTION
    """Warn when rounding into the base dtype loses more than this fraction of the delta's norm."""


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A temporary directory next to ``out_dir``, renamed to it on success, removed on failure.

    Next to (not under /tmp) so the final rename is atomic on the same filesystem.
    """
    if out_dir.exists():
        raise AlreadyExists(f"output directory {out_dir} already exists", path=str(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out_dir.exists():  # someone else created it meanwhile; never replace their directory
            raise AlreadyExists(f"output directory {out_dir} appeared during the export", path=str(out_dir))
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolve_plan(
    plan: ExportPlan | None,
    to: ExportTarget,
    adapter_dir: str | Path,
    base_dir: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_BYTES,
    base_model_name: str | None = None,
    base_sha256: Mapping[str, str] | None = None,
    adapter_sha256: Mapping[str, str] | None = None,
) -> ExportPlan:
    """The caller's plan after checking it matches this export, or a new plan (arguments as in ``plan_export``)."""
    if plan is None:
        return plan_export(
            adapter_dir,
            base_dir,
            to=to,
            shard_size=shard_size,
            base_model_name=base_model_name,
            base_sha256=base_sha256,
            adapter_sha256=adapter_sha256,
        )
    if plan.to != to:
        raise InvalidRequest(f"this plan exports to {plan.to}, not {to}")
    if (Path(adapter_dir).resolve(), Path(base_dir).resolve()) != (plan.adapter.root.resolve(), plan.base.root.resolve()):
        raise InvalidRequest("the plan was made for other input directories")
    return plan


def _run(
    plan: ExportPlan, out_dir: str | Path, progress: Progress | None, verify_options: VerifyOptions, workers: int | None = None
) -> ExportResult:
    started = time.perf_counter()
    out = Path(out_dir)
    with _staging(out) as tmp:
        try:
            write_start = time.perf_counter()
            deltas = write_merged(plan, tmp, progress, workers) if plan.to == "merged" else None
            if plan.to == "peft":
                write_peft(plan, tmp, progress)
            write_seconds = time.perf_counter() - write_start
        except WeightstoreError:
            raise
        except OSError as exc:
            raise ExportFailed(f"writing the {plan.to} export failed: {exc}") from exc
        report = verify(
            plan,
            tmp,
            deltas,
            samples=verify_options.samples,
            forward_max_bytes=verify_options.forward_max_bytes,
            rounding_warn_fraction=verify_options.rounding_warn_fraction,
        )
        files = tuple(OutputFile(p.name, p.stat().st_size) for p in sorted(tmp.iterdir()) if p.is_file())
    return ExportResult(
        to=plan.to,
        family=plan.family,
        out_dir=out,
        files=files,
        bytes_written=sum(f.size for f in files),
        seconds=time.perf_counter() - started,
        write_seconds=write_seconds,
        plan=plan.summary(),
        verification=report,
    )


def export_merged(
    adapter_dir: str | Path,
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
    base_sha256: Mapping[str, str] | None = None,
    adapter_sha256: Mapping[str, str] | None = None,
    verify_options: VerifyOptions = VerifyOptions(),
    plan: ExportPlan | None = None,
    workers: int | None = None,
) -> ExportResult:
    """Fold the adapter into the base: ``W' = W + (lora_alpha / r) * B @ A`` (fp32), written in the base dtype.

    ``out_dir`` must not exist. Output: safetensors shards of at most ``shard_size`` bytes (one
    ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus an index), ``config.json``
    (``tie_word_embeddings: false`` when a tied base gets its own ``lm_head``) and every other
    non-weight file of the base (tokenizer, generation config, ...). ``base_sha256`` /
    ``adapter_sha256`` map file names to expected digests and are checked before anything is read.
    ``progress(bytes_done, bytes_total)`` is called after each output tensor. ``workers`` merge
    threads (default: one per core, at most 4); while they run, torch's intra-op thread pool is set
    to one thread (restored afterwards). ``plan`` reuses a plan from :func:`plan_export`.
    """
    plan = _resolve_plan(
        plan, "merged", adapter_dir, base_dir, shard_size=shard_size, base_sha256=base_sha256, adapter_sha256=adapter_sha256
    )
    return _run(plan, out_dir, progress, verify_options, workers)


def export_peft(
    adapter_dir: str | Path,
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    base_model_name: str | None = None,
    progress: Progress | None = None,
    base_sha256: Mapping[str, str] | None = None,
    adapter_sha256: Mapping[str, str] | None = None,
    verify_options: VerifyOptions = VerifyOptions(),
    plan: ExportPlan | None = None,
) -> ExportResult:
    """Rewrite the adapter as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads onto the base.

    ``base_model_name`` goes into ``base_model_name_or_path`` (default: the Tinker config's value,
    else the base directory's name). The base model is read header-only (names and shapes), except
    by the forward-pass check.
    """
    plan = _resolve_plan(
        plan,
        "peft",
        adapter_dir,
        base_dir,
        base_model_name=base_model_name,
        base_sha256=base_sha256,
        adapter_sha256=adapter_sha256,
    )
    return _run(plan, out_dir, progress, verify_options)


def verify_export(
    adapter_dir: str | Path,
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    to: ExportTarget,
    verify_options: VerifyOptions = VerifyOptions(),
) -> VerificationReport:
    """Re-run verification on an existing export (raises ``VerificationFailed`` when it does not pass)."""
    plan = plan_export(adapter_dir, base_dir, to=to)
    return verify(
        plan,
        Path(out_dir),
        None,
        samples=verify_options.samples,
        forward_max_bytes=verify_options.forward_max_bytes,
        rounding_warn_fraction=verify_options.rounding_warn_fraction,
    )
