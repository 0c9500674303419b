"""Several named adapters on one (quantized) base, as peft's multi-adapter API offers.

    adapters = AdapterSet(model)                 # adopts adapters already in the model as "default"
    adapters.load("fact", "runs/fact/adapter")   # a peft LoRA / QA-LoRA directory
    adapters.load("style", "style-adapter/")
    adapters.activate("style")                   # y = base(x) + s_style · B_style A_style x
    with adapters.disabled(): ...                # y = base(x)
    adapters.unload()                            # plain base layers back, adapters dropped

Design: each adapter is a set of LoraLinear/QALoraLinear modules, one per target layer, that all
wrap the *same* base layer object (no copy of the 4-bit weights). Activating an adapter puts its
wrappers into the model and the plain base layer everywhere else, so adapters with different
targets, ranks or kinds coexist and exactly one (or none) is in the forward pass, as in peft.
Loading reuses peft_format.load_adapter on the plain model, with all its checks (kind, shapes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from torch import nn

from qlorakit.adapters.inject import adapter_kind, adapter_layers
from qlorakit.adapters.lora import LoraLinear
from qlorakit.adapters.peft_format import AdapterError, load_adapter
from qlorakit.quant.replace import set_submodule

DEFAULT_NAME = "default"


@dataclass
class NamedAdapter:
    """One adapter: its wrappers by full module name, and where it came from."""

    name: str
    layers: dict[str, LoraLinear]
    source: str

    def info(self, active: bool) -> dict:
        """name, kind, r, alpha, targets (short module names), trainable params, active?"""
        first = next(iter(self.layers.values()))
        return {
            "name": self.name,
            "kind": adapter_kind(first),
            "r": first.r,
            "alpha": first.alpha,
            "targets": sorted({n.rsplit(".", 1)[-1] for n in self.layers}),
            "params": sum(p.numel() for layer in self.layers.values() for n, p in layer.named_parameters() if not n.startswith("base_layer.")),
            "source": self.source,
            "active": active,
        }


class AdapterSet:
    """Named adapters over one model; at most one active at a time."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, NamedAdapter] = {}
        self.active: str | None = None
        existing = adapter_layers(model)
        if existing:
            self.adapters[DEFAULT_NAME] = NamedAdapter(DEFAULT_NAME, existing, "(in the model)")
            self.active = DEFAULT_NAME

    def load(self, name: str, directory: str, activate: bool = False) -> dict:
        """Load the peft adapter in `directory` as `name`; the first one loaded becomes active.

        Raises AdapterError naming the adapter: a name already used, another peft kind (IA3, ...),
        shapes that do not fit this base, modules the base does not have.
        """
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} is already loaded; unload it or choose another name")
        previous = self.active
        self._plain()
        try:
            load_adapter(self.model, directory)
        except AdapterError as error:
            self._plain()
            self._put(previous)
            raise AdapterError(f"adapter {name!r}: {error}") from None
        self.adapters[name] = NamedAdapter(name, adapter_layers(self.model), str(directory))
        self._plain()
        self._put(name if activate or previous is None else previous)
        return self.adapters[name].info(self.active == name)

    def list(self) -> list[dict]:
        """info() of every adapter, in load order."""
        return [adapter.info(name == self.active) for name, adapter in self.adapters.items()]

    def activate(self, name: str) -> None:
        """Make `name` the adapter in the forward pass (peft's set_adapter)."""
        self._check(name)
        self._plain()
        self._put(name)

    @contextlib.contextmanager
    def disabled(self):
        """Inside this block the model is the plain base (peft's disable_adapter())."""
        previous = self.active
        self._plain()
        try:
            yield self.model
        finally:
            self._put(previous)

    def deactivate(self) -> None:
        """No adapter in the forward pass until activate() (the adapters stay loaded)."""
        self._plain()

    def delete(self, name: str) -> None:
        """Drop one adapter; if it was active, the model is left with none active."""
        self._check(name)
        if self.active == name:
            self._plain()
        del self.adapters[name]

    def unload(self) -> nn.Module:
        """Restore the plain base layers and drop every adapter; returns the model."""
        self._plain()
        self.adapters.clear()
        return self.model

    def _check(self, name: str) -> None:
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none loaded"
            raise AdapterError(f"no adapter named {name!r} (loaded: {known})")

    def _plain(self) -> None:
        """Every adapter wrapper in the model replaced by the base layer it wraps."""
        for module_name, layer in adapter_layers(self.model).items():
            set_submodule(self.model, module_name, layer.base_layer)
        self.active = None

    def _put(self, name: str | None) -> None:
        if name is None:
            return
        for module_name, layer in self.adapters[name].layers.items():
            set_submodule(self.model, module_name, layer)
        self.active = name
