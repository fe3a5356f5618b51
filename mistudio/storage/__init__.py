"""The storage format, in one package: layout (geometry, unit keys, bytes), codec (a unit's bytes both ways), the
store (metadata and arrays), the writer, checked reads, verify, statistics, typed metadata and liveness.
Nothing outside it knows a byte offset."""
from .layout import StoreLayout, plan_layout
from .metadata import END_STATES, LIVE_STATES, ExtractionMeta, Status
from .reads import CheckedArray
from .store import ExtractionStore
from .verify import VerifyReport, quick_check, verify

__all__ = ["StoreLayout", "plan_layout", "ExtractionMeta", "Status", "LIVE_STATES", "END_STATES", "CheckedArray",
           "ExtractionStore", "VerifyReport", "verify", "quick_check"]
