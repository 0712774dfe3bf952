"""cmlora: training-free multi-LoRA composition (LoRA Switch, LoRA Composite, CMLoRA) on diffusers."""

from .api import Composer, ComposeResult, compose
from .errors import CmloraError, LoRAFileError, OptionError
from .loras import CATEGORIES, LoRA
from .request import GenerationRecord, GenerationRequest

__all__ = [
    "CATEGORIES",
    "CmloraError",
    "ComposeResult",
    "Composer",
    "GenerationRecord",
    "GenerationRequest",
    "LoRA",
    "LoRAFileError",
    "OptionError",
    "compose",
]
__version__ = "0.1.0"
