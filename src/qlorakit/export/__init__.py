"""Exporting models llama.cpp and ollama run: gguf.py (QA-LoRA fold written into the source GGUF;
merged 16-bit models as GGUF f16/q8_0/q4_1). Nothing is imported here: import the module you need."""
