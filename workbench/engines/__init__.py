"""Inference engines behind one interface (`workbench.engines.base.Engine`); each module registers one.

`hf` (PyTorch through Hugging Face transformers) is the reference engine; `llamacpp` runs the same model
exported to GGUF through llama.cpp (llama-cpp-python). The gguf_* modules are the llamacpp engine's file side.
"""
