"""The Python API: the CLI for notebooks, with the names people know from peft and Unsloth.

    from qlorakit import api

    model = api.from_pretrained("smollm2", quant="nf4")               # 4-bit base, frozen
    model.get_peft_model(r=16, alpha=32, targets="all-linear")         # LoRA adapters (fp32)
    model = api.train({"data": {"path": "fact.jsonl"}, "train": {"output_dir": "runs/fact", "max_steps": 25}})
    print(model.ask("What day was I born?"))
    model.save_pretrained("runs/fact/adapter-copy")                    # peft-format adapter
    model.save_pretrained_merged("runs/fact/merged", dtype="bf16")     # faithful 16-bit merge + report
    model = api.load_run("runs/fact")                                  # base + adapter, from metadata

Every call is a thin wrapper over the library functions the CLI uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from qlorakit.config import Config, config_from_dict, load_config


@dataclass
class QModel:
    """A (quantized) model, its tokenizer and the config that describes how it was made."""

    model: object
    tokenizer: object
    source: object
    config: Config

    def get_peft_model(self, r: int = 16, alpha: float = 32, dropout: float = 0.0, targets="all-linear",
                       kind: str = "lora", group_size: int | None = None, use_rslora: bool = False) -> "QModel":
        """Add adapters in place (base frozen, adapter weights fp32); returns self."""
        from qlorakit.adapters.inject import add_adapters

        adapter = replace(self.config.adapter, kind=kind, r=r, alpha=alpha, dropout=dropout, targets=targets,
                          group_size=group_size, use_rslora=use_rslora)
        self.config = replace(self.config, adapter=adapter)
        pool = self.config.adapter_group_size if kind == "qalora" else None
        add_adapters(self.model, targets, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, kind=kind, group_size=pool)
        return self

    def load_adapter(self, directory: str | Path) -> dict:
        """Apply a peft LoRA/QA-LoRA adapter directory (made by qlorakit or by peft)."""
        from qlorakit.adapters.peft_format import load_adapter

        return load_adapter(self.model, directory)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the adapter in peft's format."""
        from qlorakit.adapters.peft_format import save_adapter

        save_adapter(self.model, directory, self.source.location, self.config.adapter.dropout)

    def save_pretrained_merged(self, directory: str | Path, dtype: str = "bf16", force: bool = False, overwrite: bool = False):
        """Dequantize + fold in fp32 + cast; writes a plain HF model with a fidelity report."""
        from qlorakit.merge.run import merge_loaded
        from qlorakit.models.load import LoadedModel

        loaded = LoadedModel(self.model, self.tokenizer, self.source)
        return merge_loaded(loaded, self.config, directory, dtype=dtype, force=force, overwrite=overwrite)

    def ask(self, question: str, max_new_tokens: int = 64) -> str:
        """Greedy answer to one user turn through the chat template."""
        from qlorakit.generation import greedy_reply, user_turn
        from qlorakit.quant.linear import cached_dense_weights

        with cached_dense_weights(self.model):
            return greedy_reply(self.model, self.tokenizer, user_turn(question), max_new_tokens)


def from_pretrained(name: str = "smollm2", quant: str = "nf4", dtype: str = "bf16", group_size: int | None = None,
                    double_quant: bool = True, device: str = "cpu") -> QModel:
    """Load a model source with its linear layers quantized (quant "none" keeps them dense)."""
    from qlorakit.models.load import load_model

    quant_section = {"method": quant, "double_quant": double_quant}
    if group_size is not None:
        quant_section["group_size"] = group_size
    cfg = config_from_dict({"model": {"name": name, "dtype": dtype}, "quant": quant_section})
    loaded = load_model(name, dtype=dtype, quant=quant, group_size=group_size or cfg.quant.group_size,
                        double_quant=double_quant, device=device)
    return QModel(loaded.model, loaded.tokenizer, loaded.source, cfg)


def train(config: str | Path | dict | Config, overwrite: bool = False, progress: bool = True, **overrides) -> QModel:
    """Run `qlorakit train` on a YAML path, a dict of sections or a Config; overrides as
    keyword arguments in section__key form (train__lr=1e-4)."""
    from qlorakit.pipeline import train_then_merge

    dotted = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    if isinstance(config, Config):
        cfg = config
    elif isinstance(config, dict):
        cfg = config_from_dict(config)
    else:
        cfg = load_config(config)
    if dotted:
        from qlorakit.config import apply_overrides

        cfg = apply_overrides(cfg, dotted)
    result, _ = train_then_merge(cfg, overwrite=overwrite, progress=progress)
    return QModel(result.model, result.tokenizer, result.source, cfg)


def load_run(run_dir: str | Path, device: str = "cpu") -> QModel:
    """A run's base (quantized as in training) with its trained adapter."""
    from qlorakit.models.restore import load_run as restore

    loaded, cfg = restore(run_dir, device)
    return QModel(loaded.model, loaded.tokenizer, loaded.source, cfg)
