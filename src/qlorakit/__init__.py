"""qlorakit: QLoRA and QA-LoRA fine-tuning on 4-bit bases that stay 4-bit."""

__version__ = "0.1.0"
