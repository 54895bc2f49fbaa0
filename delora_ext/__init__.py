"""delora_ext: DeLoRA fine-tuning for PyTorch as a native C++/CUDA extension, numerically compatible with
Hugging Face PEFT's ``DeloraConfig`` adapters."""
from . import ops, reference
from .layer import DeLoRALinear
from .ops import build_info

__version__ = "0.1.0"
__all__ = ["DeLoRALinear", "build_info", "ops", "reference", "__version__"]
