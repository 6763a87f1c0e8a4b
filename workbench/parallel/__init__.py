"""Parallel and distributed execution: model placement, tensor / data parallel ranks."""
