"""Training: the loop (``SplitTrainer``), its engines (split over gRPC or local), data and checkpoints."""

from .batches import TrainingData, split_train_val
from .checkpoints import find_checkpoint, list_checkpoints
from .config import SCHEDULES, TrainConfig
from .engines import Engine, LocalEngine, SplitEngine
from .trainer import CheckpointSaved, EvalMetrics, SplitTrainer, StepMetrics, TrainerEvent, TrainingDiverged, TrainResult

__all__ = [
    "SCHEDULES",
    "CheckpointSaved",
    "Engine",
    "EvalMetrics",
    "LocalEngine",
    "SplitEngine",
    "SplitTrainer",
    "StepMetrics",
    "TrainConfig",
    "TrainResult",
    "TrainerEvent",
    "TrainingData",
    "TrainingDiverged",
    "find_checkpoint",
    "list_checkpoints",
    "split_train_val",
]
