"""Format registry: the YAML value `quant.method` (or a GGUF tensor type) -> QuantFormat class.

Entries are "module:Class" strings so that importing the registry imports no format module;
each format is imported the first time it is asked for.
"""

from __future__ import annotations

import importlib

from qlorakit.quant.base import QuantFormat

FORMATS: dict[str, str] = {
    "nf4": "qlorakit.quant.nf4:NF4",
    "fp4": "qlorakit.quant.fp4:FP4",
    "int4": "qlorakit.quant.int4:Int4",
    "q4_0": "qlorakit.quant.q4_0:Q4_0",
    "q4_1": "qlorakit.quant.q4_1:Q4_1",
    "q5_0": "qlorakit.quant.q5_0:Q5_0",
    "q5_1": "qlorakit.quant.q5_1:Q5_1",
    "q8_0": "qlorakit.quant.q8_0:Q8_0",
    "q2_k": "qlorakit.quant.q2_k:Q2_K",
    "q3_k": "qlorakit.quant.q3_k:Q3_K",
    "q4_k": "qlorakit.quant.q4_k:Q4_K",
    "q5_k": "qlorakit.quant.q5_k:Q5_K",
    "q6_k": "qlorakit.quant.q6_k:Q6_K",
    "iq4_nl": "qlorakit.quant.iq4_nl:IQ4_NL",
    "iq4_xs": "qlorakit.quant.iq4_xs:IQ4_XS",
}


def format_class(name: str) -> type[QuantFormat]:
    """Return the QuantFormat subclass registered as `name`."""
    try:
        target = FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown quantization format {name!r}; known: {', '.join(sorted(FORMATS))}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_format(name: str, group_size: int | None = None, **options) -> QuantFormat:
    """Instantiate format `name` with its default group size unless one is given."""
    cls = format_class(name)
    if group_size is None:
        group_size = cls.default_group_size
    return cls(group_size=group_size, **options)


def format_for_config(method: str, group_size: int | None = None, double_quant: bool = True) -> QuantFormat | None:
    """The format `quant.method` names (None for "none" and "gguf", which keep what the file has)."""
    if method in ("none", "gguf"):
        return None
    options = {"double_quant": double_quant} if method in ("nf4", "fp4") else {}
    return get_format(method, group_size=group_size, **options)
