"""mistudio: a model's internal activations on disk, from a notebook, without babysitting a script."""
from .api import extract, open_extraction
from .specs import HOOK_KINDS, DatasetSpec, HubDataset, ModelSpec
from .data import sample_dataset, sample_texts
from .estimate import estimate
from .errors import (DiskFull, ExtractionFailed, InputError, JobCancelled, MistudioError, StoreBusy, StoreCorrupted,
                     StoreLost)
from .extraction import Extraction
from .jobs import Job
from .metadata import Status
from .loader import ActivationLoader, loader
from .models import load_model, packaged_minilm_path
from .workspace import Workspace

__version__ = "0.1.0"
__all__ = ["extract", "estimate", "open_extraction", "sample_dataset", "sample_texts", "HubDataset", "ModelSpec",
           "DatasetSpec", "Workspace", "Job", "Extraction", "load_model", "packaged_minilm_path", "HOOK_KINDS",
           "InputError", "ExtractionFailed", "JobCancelled", "MistudioError", "StoreBusy", "StoreLost",
           "StoreCorrupted", "DiskFull", "Status", "loader", "ActivationLoader"]


def __getattr__(name: str):
    panels = ("Studio", "ModelPicker", "DatasetPicker", "ExtractionPanel", "JobsPanel", "ActivationBrowser")
    if name in panels:  # the notebook panels import ipywidgets and matplotlib: load them only when asked
        from . import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'mistudio' has no attribute {name!r}")
