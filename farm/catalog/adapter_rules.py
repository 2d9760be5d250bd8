"""What an adapter folder may hold: the one allow-list shared by the catalog (import, publish) and
the serving replica (attach).

An adapter runs on a base model that every tenant shares, so loading it must not be able to change
that base. PEFT's loader copies every tensor of adapter_model.safetensors into the model by name:
a key that names a base weight (`...mlp.down_proj.weight`) overwrites it for everyone, and some
adapter_config.json options restructure the base or train its shared parameters. So an adapter may
hold exactly:

- LoRA weights of a module: `<module>.lora_A.weight`, `<module>.lora_B.weight` (and
  `lora_B.bias` with `lora_bias`), `<module>.lora_embedding_A/B`, DoRA's `<module>.lora_magnitude_vector`;
- whole copies of the modules it declares in `modules_to_save` (PEFT adds `classifier` and
  `score` for SEQ_CLS): `<module>.<param>` where <module> is, or ends with, a declared name;

and its config may not use `bias` other than "none", `layer_replication`, `trainable_token_indices`,
`target_parameters`, or a PEFT type other than LORA. Nor may it name an initializer: PEFT runs
`init_lora_weights` when it builds the LoRA layers, and olora, pissa, corda, loftq (and lora_ga,
and the KaSA variant) rewrite the base weights they wrap; only true, false and "gaussian" (which
touch the new LoRA weights alone) are accepted, and no initializer config (`INITIALIZER_OPTIONS`).
The replica also loads every adapter through `inert_config`, so an option this list misses still
cannot run an initializer. With the base known (the replica), the module
must exist in it and every shape must fit.

No torch import: the catalog checks with the keys of a safetensors header; the replica passes a
description of its base (`{module path: {"in": n, "out": m, "params": {name: shape}}}`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

PREFIX = "base_model.model."
SEQ_CLS_HEADS = ("classifier", "score")
_LORA_KEY = re.compile(r"(?P<mod>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A"
                       r"|lora_embedding_B|lora_magnitude_vector(?:\.weight)?)")

# adapter_config.json options whose non-empty value changes what the shared base computes, or that
# this server cannot apply per row. Each: (option, why).
REFUSED_OPTIONS = (
    ("layer_replication", "it duplicates base layers, restructuring the shared model"),
    ("trainable_token_indices", "it trains rows of the shared embedding matrix"),
    ("target_parameters", "LoRA on raw parameters is not served"),
    ("alora_invocation_tokens", "activated LoRA is not served"),
    ("arrow_config", "Arrow routing is not served"),
    ("megatron_config", "Megatron-parallel LoRA layers are not served"),
)
ALLOWED_BIAS = ("none",)
# init_lora_weights values that touch only the new LoRA weights (True: PEFT's default, B = 0).
ALLOWED_INIT = (True, False, "gaussian")
# Configs of PEFT 0.21's initializers, and of the KaSA variant, whose init truncates the base weight
# with an SVD. A saved adapter has them null (loftq_config: {}); any value is refused.
INITIALIZER_OPTIONS = ("loftq_config", "eva_config", "corda_config", "lora_ga_config", "kasa_config")


def effective_modules_to_save(config: Mapping[str, Any]) -> list[str]:
    """Declared modules_to_save plus the heads PEFT itself adds for SEQ_CLS adapters."""
    declared = config.get("modules_to_save") or []
    mods = [str(m) for m in declared] if isinstance(declared, (list, tuple)) else [str(declared)]
    if config.get("task_type") == "SEQ_CLS":
        mods += [h for h in SEQ_CLS_HEADS if h not in mods]
    return mods


def check_config(config: Mapping[str, Any]) -> list[str]:
    """Problems with adapter_config.json's options (empty = fine), each naming the option."""
    problems = []
    peft_type = str(config.get("peft_type") or "").upper()
    if peft_type != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are accepted")
    bias = config.get("bias", "none") or "none"
    if bias not in ALLOWED_BIAS:
        problems.append(
            f"bias {bias!r}: training biases writes parameters of the shared base model; only 'none' is accepted"
        )
    for option, why in REFUSED_OPTIONS:
        if config.get(option):
            problems.append(f"{option} is set: {why}")
    init = config.get("init_lora_weights", True)
    if not any(init is ok or (isinstance(ok, str) and init == ok) for ok in ALLOWED_INIT):
        problems.append(
            f"init_lora_weights {init!r}: PEFT runs this initializer when the adapter is attached, and "
            "initializers other than the default rewrite the shared base weights; only true, false or 'gaussian' "
            "are accepted (a trained PiSSA/OLoRA/CorDA/LoftQ adapter must be converted to plain LoRA first, as "
            "PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) does)"
        )
    for option in INITIALIZER_OPTIONS:
        value = config.get(option)
        if value is not None and not (option == "loftq_config" and value == {}):  # {}: PEFT's saved default
            problems.append(
                f"{option} is set: it configures an initializer that rewrites the shared base weights; "
                f"only adapters without {option} (null) are accepted"
            )
    return problems


def inert_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """adapter_config.json's options with every initializer switched off: init_lora_weights false
    (PEFT then only creates the LoRA layers, which the saved weights fill) and no initializer
    config. What the replica builds its LoraConfig from, whatever the allow-list let through."""
    out = {k: v for k, v in config.items() if k not in INITIALIZER_OPTIONS and k != "runtime_config"}
    out["init_lora_weights"] = False
    return out


def _is_copy(module: str, modules_to_save: Sequence[str]) -> bool:
    return any(module == m or module.endswith("." + m) for m in modules_to_save)


def check_tensors(
    config: Mapping[str, Any], tensors: Mapping[str, Sequence[int]], base: Mapping[str, Mapping[str, Any]] | None = None
) -> list[str]:
    """Problems with the weights' keys (and, given the base's description, their shapes)."""
    problems = []
    copies = effective_modules_to_save(config)
    for key in sorted(tensors):
        shape = list(tensors[key])
        if not key.startswith(PREFIX):
            problems.append(f"tensor {key!r}: not a PEFT adapter key (expected the {PREFIX!r} prefix)")
            continue
        rel = key[len(PREFIX):]
        m = _LORA_KEY.fullmatch(rel)
        if m:
            problems += _check_lora(key, m["mod"], m["kind"], shape, base)
            continue
        module, _, param = rel.rpartition(".")
        if module and _is_copy(module, copies) and ".base_layer" not in f".{module}.":
            problems += _check_copy(key, module, param, shape, base)
            continue
        hint = ""
        if ".base_layer." in f".{rel}":
            hint = " (a full base weight; save embedding-layer LoRA with save_embedding_layers=False)"
        elif module and not copies:
            hint = " (not a LoRA weight, and the adapter declares no modules_to_save)"
        problems.append(
            f"tensor {key!r}: an adapter may hold only LoRA A/B weights and copies of its declared "
            f"modules_to_save {copies}; this key would overwrite a weight of the shared base{hint}"
        )
    return problems


def _check_lora(key: str, module: str, kind: str, shape: list[int], base) -> list[str]:
    if base is None:
        return []
    info = base.get(module)
    if info is None or "in" not in info:
        return [f"tensor {key!r}: the served base has no linear or embedding module {module!r}"]
    n_in, n_out = info["in"], info["out"]
    ok = {
        "lora_A.weight": len(shape) == 2 and shape[1] == n_in,
        "lora_B.weight": len(shape) == 2 and shape[0] == n_out,
        "lora_B.bias": shape == [n_out],
        "lora_embedding_A": len(shape) == 2 and shape[1] == n_in,
        "lora_embedding_B": len(shape) == 2 and shape[0] == n_out,
    }.get(kind, shape == [n_out])  # lora_magnitude_vector
    if not ok:
        return [f"tensor {key!r}: shape {shape} does not fit module {module!r} ({n_in} in, {n_out} out)"]
    return []


def _check_copy(key: str, module: str, param: str, shape: list[int], base) -> list[str]:
    if base is None:
        return []
    info = base.get(module)
    if info is None:
        return [f"tensor {key!r}: modules_to_save copy of {module!r}, which the served base does not have"]
    want = info.get("params", {}).get(param)
    if want is None or list(want) != shape:
        return [f"tensor {key!r}: shape {shape} does not fit {module}.{param} of the served base ({want})"]
    return []


def check_adapter(
    config: Mapping[str, Any], tensors: Mapping[str, Sequence[int]], base: Mapping[str, Mapping[str, Any]] | None = None
) -> list[str]:
    """Every problem that makes this adapter unsafe to load next to other tenants (empty = fine)."""
    return check_config(config) + check_tensors(config, tensors, base)


def refusal(where: str, problems: list[str], limit: int = 5) -> str:
    """One message for a refused adapter: where, and the first few problems."""
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{where}: adapter refused: " + "; ".join(problems[:limit]) + more
