"""How the processes of one run agree: the single-process coordinator (distributed ones extend it)."""

from __future__ import annotations

from typing import Any


class Coordinator:
    """One process, one rank: every decision is its own. Distributed runs subclass this."""

    kind = "single"
    rank = 0
    world_size = 1
    backend: str | None = None

    def any(self, flag: bool) -> bool:
        """True when any rank says True (stop requested, enough repeats): keeps ranks in lockstep."""
        return flag

    def barrier(self) -> None:
        """Wait for every rank."""

    def my_rows(self, rows: list[list[int]]) -> list[list[int]]:
        """This rank's share of the batch's prompts (data parallel splits them; others keep all)."""
        return rows

    def load_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments (tensor parallel passes its plan)."""
        return {}

    @property
    def emits(self) -> bool:
        """Whether this rank reports events and the result (rank 0)."""
        return self.rank == 0
