"""``DeLoRAConfig``: PEFT's ``DeloraConfig`` fields, names, defaults and matching rules, without PEFT."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Iterable

from torch import nn

# transformers model_type -> default target modules (PEFT's TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING,
# which is its LoRA mapping), for target_modules=None.
DEFAULT_TARGET_MODULES = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "llama": ["q_proj", "v_proj"], "gpt_bigcode": ["c_attn"],
    "falcon": ["query_key_value"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"],
    "blip-2": ["q", "v", "q_proj", "v_proj"], "deberta": ["in_proj"], "layoutlm": ["query", "value"],
    "llama4": ["q_proj", "v_proj"], "chatglm": ["query_key_value"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"], "gemma3_text": ["q_proj", "v_proj"], "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"], "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

ALL_LINEAR = "all-linear"
PEFT_TYPE = "DELORA"
# The peft_type written for an adapter with the paper's init. PEFT has no field for its frozen initial term: under
# "DELORA" it would load A, B and λ without it and compute other outputs, with no warning; a type PEFT does not
# know makes its loaders refuse the file.
PAPER_PEFT_TYPE = "DELORA_PAPER_INIT"


@dataclasses.dataclass
class DeLoRAConfig:
    """DeLoRA adapter configuration; every field is PEFT's ``DeloraConfig`` field of the same name.

    ``init_weights`` also accepts ``"paper"`` (the paper's init, see ``DeLoRALinear.update_layer``); such an
    adapter cannot be saved for PEFT, which has no field for the frozen initial update.
    """

    r: int = 8
    delora_lambda: float = 15
    module_dropout: float = 0.0
    target_modules: list | str | None = None
    exclude_modules: list | str | None = None
    bias: str = "none"
    init_weights: bool | str = True
    layers_to_transform: list | int | None = None
    layers_pattern: list | str | None = None
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    lambda_pattern: dict = dataclasses.field(default_factory=dict)
    modules_to_save: list | None = None

    def __post_init__(self):
        # Types are settled here, once: whatever a config holds is what its adapter_config.json holds, so a config
        # that patch() accepts also saves and loads (a string λ or a numpy scalar would not).
        self.r = _positive_int(self.r, "r")
        self.delora_lambda = _lambda_value(self.delora_lambda, "delora_lambda")
        self.module_dropout = _real(self.module_dropout, "module_dropout", "a number in [0, 1)")
        if self.bias not in ("none", "all", "delora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'delora_only', got {self.bias!r}")
        if self.init_weights not in (True, False, "paper") or type(self.init_weights) not in (bool, str):
            raise ValueError(f"`init_weights` must be True, False or 'paper', got {self.init_weights!r}")
        check_module_dropout(self.module_dropout)
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if v is None or isinstance(v, str):
                continue
            if not isinstance(v, (list, set, tuple)) or not all(isinstance(x, str) for x in v):
                raise TypeError(f"`{name}` must be None, a regex string or a list of module names, got {v!r}")
            if isinstance(v, (set, tuple)):
                setattr(self, name, sorted(v))
        for name in ("layers_to_transform", "layers_pattern", "modules_to_save"):  # saved as JSON lists
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if isinstance(self.layers_to_transform, numbers.Integral) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = int(self.layers_to_transform)
        elif isinstance(self.layers_to_transform, list):
            self.layers_to_transform = [int(i) if isinstance(i, numbers.Integral) and not isinstance(i, bool) else i
                                        for i in self.layers_to_transform]
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # as PEFT: a regex (or "all-linear") is matched as is, so layers_to_transform would be silently ignored
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str "
                             f"({self.target_modules!r}); list the module names instead")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        for name in ("rank_pattern", "lambda_pattern"):
            v = getattr(self, name)
            if v is None:
                setattr(self, name, {})
            elif not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                raise TypeError(f"`{name}` must be a dict mapping module name patterns (str) to values, got {v!r}")
        self.rank_pattern = {k: _positive_int(v, f"rank_pattern[{k!r}]") for k, v in self.rank_pattern.items()}
        self.lambda_pattern = {k: _lambda_value(v, f"lambda_pattern[{k!r}]") for k, v in self.lambda_pattern.items()}
        d = self.to_peft_dict()
        check_peft_dict_types(d)  # the checks load_adapter applies to the file
        try:
            json.dumps(d)
        except (TypeError, ValueError) as e:
            raise TypeError(f"DeLoRAConfig cannot be written as adapter_config.json ({e})") from None

    def __eq__(self, other) -> bool:
        """Equal configs adapt the same modules the same way. ``target_modules`` and ``exclude_modules`` lists are
        sets (PEFT stores them as sets and writes them in hash order, which changes between processes), and so is
        ``modules_to_save``; 15 equals 15.0."""
        if not isinstance(other, DeLoRAConfig):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None

    def _key(self) -> tuple:
        def norm(name):
            v = getattr(self, name)
            if name in ("target_modules", "exclude_modules", "modules_to_save") and isinstance(v, list):
                return frozenset(v)
            if isinstance(v, dict):
                return tuple(sorted(v.items()))
            if isinstance(v, list):
                return tuple(v)
            return v
        return tuple((f.name, norm(f.name)) for f in dataclasses.fields(self))

    # ---- PEFT's adapter_config.json -------------------------------------------------------------------
    PEFT_FIELDS = ("r", "delora_lambda", "module_dropout", "target_modules", "exclude_modules", "bias",
                   "init_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "lambda_pattern",
                   "modules_to_save")

    def to_peft_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.PEFT_FIELDS}
        d.update(peft_type=PAPER_PEFT_TYPE if self.init_weights == "paper" else PEFT_TYPE, task_type=None,
                 inference_mode=False, base_model_name_or_path=None, revision=None, auto_mapping=None)
        return d

    @classmethod
    def from_peft_dict(cls, d: dict) -> DeLoRAConfig:
        if not isinstance(d, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(d).__name__}")
        pt = d.get("peft_type")
        if pt == PAPER_PEFT_TYPE:
            if d.get("init_weights") != "paper":
                raise ValueError(f"adapter config has peft_type {PAPER_PEFT_TYPE!r} (the paper's init) but "
                                 f"init_weights={d.get('init_weights')!r}, not 'paper'")
        elif pt != PEFT_TYPE:  # (an adapter with the paper's init saved as "DELORA" loads too)
            raise ValueError(f"adapter config is for peft_type {pt!r}, not 'DELORA'")
        return cls(**{k: d[k] for k in cls.PEFT_FIELDS if k in d})

    def rank_for(self, key: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)

    def lambda_for(self, key: str) -> float:
        return self.lambda_pattern.get(_pattern_key(self.lambda_pattern, key), self.delora_lambda)


def _pattern_key(patterns, key: str) -> str:
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", key)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


def _listed(spec, key: str) -> bool:
    """PEFT's rule: a string is a regex (full match); a list matches exactly or as a '.'-suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith(f".{t}") for t in spec)


def _real(value, name: str, what: str):
    """A real number (numpy scalars become Python floats); not a bool, a string or a tensor."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {what}, got {value!r} ({type(value).__name__})")
    return value if type(value) in (int, float) else float(value)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")  # PEFT's DeloraConfig message
    return int(value)


def _lambda_value(value, name: str):
    v = _real(value, name, "a real number")
    if not math.isfinite(v) or abs(v) > FLOAT32_MAX:  # λ is an fp32 parameter
        raise ValueError(f"`{name}` must be finite in float32 (|λ| <= {FLOAT32_MAX:.6g}), got {v!r}")
    return v


def check_module_dropout(value) -> float:
    """``module_dropout`` as a float in [0, 1), or an error naming it."""
    p = float(_real(value, "module_dropout", "a number in [0, 1)"))
    if not 0.0 <= p < 1.0:
        raise ValueError(f"`module_dropout` must be in [0, 1), got {value!r}")
    return p


def is_module_to_save(key: str, modules_to_save) -> bool:
    """PEFT's rule for modules_to_save (``peft.utils.other._set_trainable``): a plain string suffix,
    ``key.endswith(name)``, without a '.' boundary (["head"] selects ``lm_head``)."""
    return bool(key) and bool(modules_to_save) and any(key.endswith(m) for m in modules_to_save)


def matches(config: DeLoRAConfig, key: str, target_modules) -> bool:
    """Whether module ``key`` is targeted (PEFT's check_target_module_exists)."""
    if config.exclude_modules and _listed(config.exclude_modules, key):
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True
    found = any(key.endswith(f".{t}") for t in target_modules)
    idx = config.layers_to_transform
    if found and idx is not None and (not isinstance(idx, list) or len(idx) > 0):
        m = None
        if not config.layers_pattern:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            pats = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
            for pat in pats:
                m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
                if m:
                    break
        if m is None:
            return False
        layer = int(m.group("idx"))
        return layer == idx if isinstance(idx, int) else layer in idx
    return found


# ---- argument checks shared by the layer, the model operations and the file loader -------------------------
MAX_NAME_BYTES = 255  # a folder name in saved adapter directories (NAME_MAX on Linux, macOS and Windows)


# Attribute names of the containers an adapter name keys (nn.ParameterDict, the buffer dicts, nn.Module): such a
# name would shadow a method or the module's own state (``training``: model.eval() then fails for good).
_RESERVED = frozenset(dir(nn.ParameterDict())) | frozenset(dir(nn.Module()))


def check_adapter_name(name) -> str:
    """An adapter name: a non-empty string without '.', '/', '\\' or NUL, at most 255 bytes as a file name, and not
    an attribute of the containers it keys (it is a state_dict key part, a ParameterDict key and a folder name in
    saved adapter directories: a name with a separator wrote outside the directory)."""
    if not isinstance(name, str) or not name or any(c in name for c in "./\\\0"):
        raise ValueError(f"`adapter_name` must be a non-empty string without '.', '/' or '\\' (and without NUL), "
                         f"got {name!r}")
    try:
        size = len(os.fsencode(name))
    except UnicodeError:
        raise ValueError(f"`adapter_name` {name!r} cannot be a file name (not encodable in the file system's "
                         f"encoding)") from None
    if size > MAX_NAME_BYTES:
        raise ValueError(f"`adapter_name` must be at most {MAX_NAME_BYTES} bytes as a file name, got {size} bytes "
                         f"({name[:40]!r}...)")
    if name in _RESERVED:
        raise ValueError(f"`adapter_name` {name!r} is an attribute of torch's nn.Module / nn.ParameterDict, which "
                         f"key adapters by name; pick another name")
    return name


def adapter_list(adapter_names, arg: str = "adapter_names") -> list[str]:
    """A bare string is one adapter name (not a sequence of one-letter names). A name listed twice is refused:
    merging or activating it twice would add its ΔW twice."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    dup = sorted({n for n in names if names.count(n) > 1}, key=str)
    if dup:
        raise ValueError(f"`{arg}` lists {', '.join(map(repr, dup))} more than once: {names!r}")
    return names


def check_known(names: Iterable[str], known, where: str, arg: str = "adapter_names") -> None:
    """Every name is an adapter of ``known`` (a container keyed by adapter name), or a ValueError naming ``arg``."""
    for n in names:
        if n not in known:
            raise ValueError(f"`{arg}`: unknown adapter {n!r}; {where} has {list(known)}")


def check_lambda(value, name: str = "delora_lambda") -> float:
    """λ as a float finite in float32 (it becomes an fp32 parameter), or an error naming it."""
    return float(_lambda_value(value, name))


# ---- the JSON types of a (possibly foreign) adapter_config.json -------------------------------------------
def _bad_field(raw: dict, field: str, what: str) -> ValueError:
    value = repr(raw[field])
    return ValueError(f"`{field}` must be {what}, got {value[:200]}{'...' if len(value) > 200 else ''}")


FLOAT32_MAX = 3.4028234663852886e38


def check_peft_dict_types(raw: dict) -> None:
    """JSON types of a config file's fields, which DeLoRAConfig takes as given; regexes compile.

    DeLoRAConfig checks r, bias and module_dropout's range itself; this refuses what would otherwise fail (or be
    silently misread) only when the model is patched: a string λ, a list of non-strings as target_modules, ...
    """
    def real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def lam(v):  # λ becomes an fp32 parameter: 1e308 is finite in JSON but not in fp32
        return real(v) and math.isfinite(v) and abs(v) <= FLOAT32_MAX

    def str_list(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def regex(field, pattern, form="{}"):
        try:
            re.compile(form.format(pattern))
        except (re.error, RecursionError, OverflowError) as e:
            raise ValueError(f"`{field}`: {pattern[:200]!r} is not a valid regular expression ({e})") from None

    if "delora_lambda" in raw and not lam(raw["delora_lambda"]):
        raise _bad_field(raw, "delora_lambda", "a number finite in float32")
    if "module_dropout" in raw and not real(raw["module_dropout"]):
        raise _bad_field(raw, "module_dropout", "a number in [0, 1)")
    if "init_weights" in raw and not (isinstance(raw["init_weights"], bool) or raw["init_weights"] == "paper"):
        raise _bad_field(raw, "init_weights", "true, false or \"paper\"")
    if "bias" in raw and not isinstance(raw["bias"], str):
        raise _bad_field(raw, "bias", "\"none\", \"all\" or \"delora_only\"")
    for field in ("target_modules", "exclude_modules"):
        v = raw.get(field)
        if v is not None and not (isinstance(v, str) or str_list(v)):
            raise _bad_field(raw, field, "null, a regex string or a list of module names")
        if isinstance(v, str):
            regex(field, v)
    v = raw.get("layers_to_transform")
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool)) and not (
            isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise _bad_field(raw, "layers_to_transform", "null, a layer index or a list of layer indices")
    v = raw.get("layers_pattern")
    if v is not None and not (isinstance(v, str) or str_list(v)):
        raise _bad_field(raw, "layers_pattern", "null, a string or a list of strings")
    for p in [v] if isinstance(v, str) else v or []:
        regex("layers_pattern", p, r"(?:^|.*?\.){}\.(?P<idx>\d+)\.")
    for field, ok, what in (("rank_pattern", lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0,
                             "positive integers"),
                            ("lambda_pattern", lam, "numbers finite in float32")):
        v = raw.get(field)
        if v is not None and not (isinstance(v, dict) and all(ok(x) for x in v.values())):
            raise _bad_field(raw, field, f"an object mapping module name patterns to {what}")
        for p in v or {}:
            regex(field, p, r"(.*\.)?({})$")
    v = raw.get("modules_to_save")
    if v is not None and not str_list(v):
        raise _bad_field(raw, "modules_to_save", "null or a list of module names")
    for m in v or []:
        regex("modules_to_save", m, r"(^|.*\.){}($|\..*)")
