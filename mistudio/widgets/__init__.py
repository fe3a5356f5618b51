"""Notebook panels (pure ipywidgets): each tab is usable alone, or all together in ``Studio``."""
from .browser import ActivationBrowser
from .dataset_picker import DatasetPicker
from .extraction_panel import ExtractionPanel
from .features_panel import FeaturesPanel
from .jobs_panel import JobsPanel
from .model_picker import ModelPicker
from .studio import Studio
from .train_panel import TrainPanel

__all__ = ["Studio", "ModelPicker", "DatasetPicker", "ExtractionPanel", "JobsPanel", "ActivationBrowser",
           "FeaturesPanel", "TrainPanel"]
