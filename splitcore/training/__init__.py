"""Training: the loop (``SplitTrainer``), its engines (split over gRPC or local), data and checkpoints."""

from splitcore.training.batches import TrainingData, split_train_val
from splitcore.training.checkpoints import find_checkpoint, list_checkpoints
from splitcore.training.config import SCHEDULES, TrainConfig
from splitcore.training.engines import Engine, LocalEngine, SplitEngine
from splitcore.training.trainer import CheckpointSaved, EvalMetrics, SplitTrainer, StepMetrics, TrainerEvent, TrainingDiverged, TrainResult

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
