"""deepseek-ce, the Community Edition: load or build a model, train it on one file on one device, generate.

    from deepseek_ce import Model, Trainer, TrainingConfig
    model = Model.from_pretrained("deepseek-base")
    trainer = Trainer(model=model, train_data="corpus.txt", config=TrainingConfig(max_steps=200))
    trainer.fit()

`Model` and `TrainingConfig` are deepseek_core's (the same classes every edition exports).
"""

from deepseek_core.facade import Model
from deepseek_core.training import DataError, TrainingConfig, TrainingDivergedError, train_tokenizer

from .trainer import Trainer, TrainResult

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "Model",
    "TrainResult",
    "Trainer",
    "TrainingConfig",
    "TrainingDivergedError",
    "__version__",
    "train_tokenizer",
]
