"""Notebook panels (pure ipywidgets): each tab is usable alone, or all together in ``Studio``."""
from .browser import ActivationBrowser
from .dataset_picker import DatasetPicker
from .extraction_panel import ExtractionPanel
from .jobs_panel import JobsPanel
from .model_picker import ModelPicker
from .studio import Studio

__all__ = ["Studio", "ModelPicker", "DatasetPicker", "ExtractionPanel", "JobsPanel", "ActivationBrowser"]
