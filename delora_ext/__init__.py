"""delora_ext: DeLoRA fine-tuning for PyTorch as a native C++/CUDA extension, numerically compatible with
Hugging Face PEFT's ``DeloraConfig`` adapters."""
from . import ops, reference
from .config import DeLoRAConfig
from .inference import clear_inference_cache, mixed_batch
from .io import adapter_state_dict, load_adapter, save_adapter
from .layer import DeLoRALayer, DeLoRALinear
from .lora_export import export_lora
from .ops import build_info
from .patching import (
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    patch,
    set_adapter,
    trainable_parameters,
    unmerge,
    unpatch,
)
from .training import attach_callback, param_groups

# PEFT's spellings, so a PEFT user's first guess works
DeloraConfig = DeLoRAConfig
DeloraLinear = DeLoRALinear

__version__ = "0.1.0"
__all__ = [
    "DeLoRAConfig", "DeLoRALayer", "DeLoRALinear", "DeloraConfig", "DeloraLinear", "adapter_state_dict",
    "build_info", "delete_adapter", "disable_adapters", "export_lora", "load_adapter", "merge", "merge_and_unload",
    "ops", "patch", "reference", "save_adapter", "set_adapter", "trainable_parameters", "unmerge", "unpatch",
    "__version__", "attach_callback", "clear_inference_cache", "mixed_batch", "param_groups",
]


def __getattr__(name: str):
    # optional dependencies, imported on first use (so neither is in __all__): delora_ext.peft needs peft,
    # DeLoRACallback transformers. A missing one is an AttributeError (hasattr() and introspection stay safe)
    # that carries the install hint.
    if name in ("peft", "DeLoRACallback"):
        import importlib
        try:
            if name == "peft":
                return importlib.import_module(".peft", __name__)
            return importlib.import_module(".training", __name__).DeLoRACallback
        except ImportError as e:
            raise AttributeError(f"delora_ext.{name} is unavailable: {e}") from e
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
