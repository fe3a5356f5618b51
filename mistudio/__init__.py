"""mistudio: a model's internal activations on disk, from a notebook, without babysitting a script.

Names load on first use (``ms.extract`` imports the model code then), so that the command line and
``import mistudio`` start fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_ERRORS = ("InputError", "ExtractionFailed", "JobCancelled", "MistudioError", "StoreBusy", "StoreLost",
           "StoreCorrupted", "DiskFull")
_PANELS = ("Studio", "ModelPicker", "DatasetPicker", "ExtractionPanel", "JobsPanel", "ActivationBrowser",
           "FeaturesPanel", "TrainPanel")
_WHERE = {
    "extract": "api", "open_extraction": "api", "estimate": "plan", "sample_dataset": "data",
    "sample_texts": "data", "HubDataset": "specs", "ModelSpec": "specs", "HOOK_KINDS": "specs", "Request": "request",
    "Workspace": "workspace", "Job": "jobs", "Extraction": "extraction", "load_model": "models",
    "TrainingJob": "training", "TrainConfig": "analysis.sae_training", "load_sae": "saes", "SAE": "saes",
    "packaged_minilm_path": "models", "Status": "storage.metadata", "loader": "analysis.loader",
    "ActivationLoader": "analysis.loader", **{name: "errors" for name in _ERRORS},
    **{name: "widgets" for name in _PANELS},
}
# submodules shown as attributes: ms.feature_view is mistudio.analysis.feature_view
_MODULES = {"feature_view": "analysis.feature_view", "plots": "analysis.plots", "analysis": "analysis",
            "features": "analysis.features", "feature_page": "analysis.feature_page", "exports": "analysis.exports",
            "storage": "storage", "request": "request", "plan": "plan"}
__all__ = sorted(_WHERE) + list(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{_MODULES[name]}", __name__)
    else:
        raise AttributeError(f"module 'mistudio' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
