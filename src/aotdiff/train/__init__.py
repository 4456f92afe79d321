"""Training: configuration and presets (``config``), the trainer (``loop``), the run directory (``rundir``), EMA
(``ema``), checkpoints and model loading (``checkpoint``).

``load_model`` is re-exported here: ``aotdiff.train.load_model(path)`` rebuilds a denoiser from a run directory, a
checkpoint folder or a weights file.
"""

from aotdiff.train.checkpoint import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
