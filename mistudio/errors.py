"""Error types and the classification of failures into plain-words classes."""
from __future__ import annotations

ERROR_TYPES = ("OOM", "VALIDATION", "TIMEOUT", "INTERRUPTED", "UNKNOWN")

_OOM_MARKERS = (
    "out of memory",  # CUDA, HIP, generic
    "mps backend out of memory",
    "defaultcpuallocator: can't allocate memory",
    "can't allocate memory",
    "not enough memory",
    "failed to allocate memory",
)


class MistudioError(Exception):
    """Base class of every error mistudio raises on purpose."""


class InputError(MistudioError, ValueError):
    """A value the user gave is wrong. The message names the value and the fix."""


class JobCancelled(MistudioError):
    """Raised inside a job when its cancel token is set; the job ends CANCELLED."""


class JobTimeout(MistudioError):
    """Raised inside a job that ran past its ``timeout_s``."""


class StoreBusy(MistudioError):
    """A live job already owns the store this operation wants to write."""


class StoreCorrupted(MistudioError):
    """Part of a store is damaged or missing: names the store, the array, the chunk and the file."""

    def __init__(self, location: str, what: str, array: str | None = None, chunk: tuple | None = None,
                 file: str | None = None):
        self.location, self.array, self.chunk, self.file, self.what = location, array, chunk, file, what
        where = "".join([f" array {array}" if array else "", f" chunk {chunk}" if chunk is not None else "",
                         f" (file {file})" if file else ""])
        super().__init__(f"store {location} is damaged:{where}: {what}. Run `mistudio verify <id>` for a full "
                         "report; re-extract (retry) to repair it")


class ExtractionFailed(MistudioError):
    """``ms.extract`` ran a job that ended FAILED; carries the job's error record."""

    def __init__(self, extraction_id: str, error: dict):
        self.extraction_id = extraction_id
        self.error = error
        hint = ""
        if error.get("suggested_retry_params"):
            hint = f" Suggested retry: {error['suggested_retry_params']}."
        super().__init__(f"[{error['error_type']}] {error['error_message']}{hint} (extraction {extraction_id})")


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU out-of-memory errors, by type or by the allocator's message."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(marker in text for marker in _OOM_MARKERS)
    return False


def classify(exc: BaseException, params: dict) -> dict:
    """Turn an exception raised by a job into its error record (type, words, suggested retry)."""
    batch_size = int(params.get("batch_size", 8))
    if is_oom(exc):
        smaller = max(1, batch_size // 2)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if batch_size > 1:
            advice = f"Retry with batch_size={smaller}"
        else:
            advice = "Batch size is already 1: use a shorter max_length, fewer layers, or a bigger device"
        return {
            "error_type": "OOM",
            "error_message": f"Out of memory at batch_size={batch_size}: {first_line}. {advice}.",
            "suggested_retry_params": {"batch_size": smaller} if batch_size > 1 else {},
        }
    if isinstance(exc, (InputError, StoreBusy)):
        return {"error_type": "VALIDATION", "error_message": str(exc), "suggested_retry_params": {}}
    if isinstance(exc, JobTimeout):
        max_samples = params.get("max_samples")
        suggested = {"max_samples": max(1, int(max_samples) // 2)} if max_samples else {}
        return {
            "error_type": "TIMEOUT",
            "error_message": f"{exc} Resume it to continue from what was saved, or retry with fewer samples.",
            "suggested_retry_params": suggested,
        }
    return {
        "error_type": "UNKNOWN",
        "error_message": f"{type(exc).__name__}: {exc}",
        "suggested_retry_params": {},
    }
