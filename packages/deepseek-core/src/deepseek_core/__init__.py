"""deepseek-core: DeepSeek-family transformers, Hugging Face-compatible checkpoints and tokenizers.

The inference engine lives in deepseek_core.engine, the OpenAI-compatible server in deepseek_core.serving.
"""

from .checkpoint import load_model, save_model
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, DeepSeekError, ModelNotFoundError
from .facade import Model
from .model import Transformer
from .presets import preset_names
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DeepSeekError",
    "Model",
    "ModelConfig",
    "ModelNotFoundError",
    "Tokenizer",
    "Transformer",
    "__version__",
    "load_model",
    "preset_names",
    "save_model",
]
