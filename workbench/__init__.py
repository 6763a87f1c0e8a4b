"""LLM Inference Workbench core: load a causal LM, apply techniques, measure latency, memory, accuracy."""

from workbench import deferred

__version__ = "0.1.0"

deferred.install()  # hqq's import at transformers' start-up waits until a run uses it (1.5-2.3 s per process)
