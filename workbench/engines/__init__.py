"""Inference engines behind one interface (`workbench.engines.base.Engine`); each module registers one.

`hf` (PyTorch through Hugging Face transformers) is the reference engine.
"""
