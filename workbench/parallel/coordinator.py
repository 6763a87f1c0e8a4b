"""How the processes of one run agree: the single-process coordinator (distributed ones extend it)."""

from __future__ import annotations

from typing import Any

from workbench.result import ParallelInfo, RankInfo


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

    def info(self, device: str, threads: int, rows: int, busy: float | None, decode: float | None,
             split: Any = None) -> ParallelInfo:
        """This process's share of the work (a distributed launcher merges the ranks' infos); `split` is the
        engine's placement over devices, if any."""
        rank = RankInfo(self.rank, device, threads, rows, busy, decode)
        return ParallelInfo(kind="split" if split else self.kind, world_size=self.world_size, backend=self.backend,
                            placement=split.device_map if split else {},
                            bytes_by_device=split.bytes_by_device if split else {}, ranks=(rank,),
                            aggregate_decode_tokens_per_s=decode)
