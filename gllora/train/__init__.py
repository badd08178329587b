"""Training, evaluation and prediction: the only part of gllora that knows optax, orbax
and metrics files."""

from gllora.train.loop import train_and_evaluate
from gllora.train.predictor import Predictor

__all__ = ["Predictor", "train_and_evaluate"]
