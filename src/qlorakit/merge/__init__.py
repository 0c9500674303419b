"""Merging adapters into their base: fold.py (dequantize + fold in fp32 -> plain transformers
model), fidelity.py (adapter model vs merge), requantize.py (peft's re-quantizing merge, for
comparison), survival.py (how much of the update a merge kept), write.py (atomic HF directory).
Nothing is imported here: import the module you need."""
