"""Exact export of a DeLoRA adapter as a PEFT LoRA adapter, for serving stacks that know LoRA only.

DeLoRA's ΔW = (B ⊙ s)(A ⊙ w) is a rank-r LoRA with folded factors, so lora_A = A ⊙ w, lora_B = B ⊙ s and
lora_alpha = r (scaling 1) give the same outputs (a paper-init adapter: rank 2r, its frozen term appended).
"""
from __future__ import annotations

import hashlib
import json
import re

from . import core
from .config import check_known
from .core import is_conv1d
from .io import PREFIX, _write_pairs, adapter_modules_to_save, bias_tensors, check_directory, untied
from .model import delora_layers, require_state, unwrap, warn_if_aliased


def export_lora(model, directory: str, adapter_name: str = "default") -> None:
    """Write a PEFT LoRA adapter whose outputs equal this DeLoRA adapter's: lora_A = A ⊙ w, lora_B = B ⊙ s,
    lora_alpha = r (scaling 1). A paper-init adapter exports as rank 2r: [A' ; A₀'] and [B' | −B₀']. All or
    nothing, as ``save_adapter``: a failed export leaves ``directory`` as it was."""
    directory = check_directory("export_lora", directory)
    model = unwrap(model)
    state = require_state(model)
    warn_if_aliased(model, "export_lora")
    check_known([adapter_name], state.configs, "the model", "adapter_name")
    cfg = state.configs[adapter_name]
    tensors, ranks, conv = {}, {}, False
    for path, layer in delora_layers(model).items():
        if adapter_name not in layer.delora_A:
            continue
        layer.resolve_w()
        terms = layer._terms(adapter_name)
        Af, Bs = core.folded(terms, [1.0, -1.0][:len(terms)])
        tensors[f"{PREFIX}{path}.lora_A.weight"] = Af.cpu().contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = Bs.cpu().contiguous()
        ranks[path] = Af.shape[0]
        conv = conv or is_conv1d(layer.base_layer)
    for mpath, mod in adapter_modules_to_save(model, cfg, adapter_name).items():
        for pname, p in mod.state_dict().items():
            tensors[f"{PREFIX}{mpath}.{pname}"] = p.detach().cpu().contiguous()
    for k, t in bias_tensors(model, cfg, adapter_name).items():
        tensors.setdefault(f"{PREFIX}{k}", t.detach().cpu().contiguous())
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    # PEFT matches a rank_pattern key and a target_modules entry as a suffix of a module's path ("0" matches
    # "1.0" too): the keys are anchored at the start, and the targets become one full-match regex wherever some
    # other module's path ends in a target's.
    pattern = {"^" + re.escape(p): r for p, r in ranks.items() if r != r0}
    names = [n for n, _ in model.named_modules()]
    suffixed = any(n != p and n.endswith("." + p) for p in ranks for n in names)
    targets = ("^(?:" + "|".join(re.escape(p) for p in sorted(ranks)) + ")$") if suffixed else sorted(ranks)
    lora_cfg = {
        "peft_type": "LORA", "task_type": None, "r": r0, "lora_alpha": r0, "rank_pattern": pattern,
        "alpha_pattern": dict(pattern), "target_modules": targets, "lora_dropout": 0.0,
        "bias": {"delora_only": "lora_only"}.get(cfg.bias, cfg.bias),
        "fan_in_fan_out": conv, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": cfg.modules_to_save, "inference_mode": True, "base_model_name_or_path": None,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    cfg_bytes = (json.dumps(lora_cfg, indent=2, sort_keys=True) + "\n").encode("utf-8")
    # as save_adapter: all or nothing, the weights stamped with their config, renamed in under the folder lock
    _write_pairs([(directory, untied(tensors), cfg_bytes, hashlib.sha256(cfg_bytes).hexdigest())])

