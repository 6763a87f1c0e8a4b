"""Voila's kernel manager with a cap on kernels: the (M+1)-th visitor gets a "busy, try again" page.

Voila starts one kernel per page load through `VoilaConfiguration.multi_kernel_manager_class`, before it
writes any of the page. `workbench dashboard --max-users M` names this class there; its `start_kernel`
counts the kernels alive plus those being started (checked and counted with no `await` in between, so two
visitors arriving together cannot both take the last place) and refuses the rest with HTTP 503, whose
reason Voila's error page shows as its heading. A closed page's kernel is shut down by Voila (and idle
ones are culled), which frees its place. Imported only inside the Voila server.
"""

from __future__ import annotations

import logging
from typing import Any

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado.web import HTTPError
from traitlets import Integer

logger = logging.getLogger(__name__)


def busy_reason(max_kernels: int) -> str:
    """The one sentence a visitor over the limit reads (an HTTP reason: one line, ASCII)."""
    people = "person" if max_kernels == 1 else "people"
    return (f"Busy - this dashboard already serves {max_kernels} {people}, its limit. "
            "Please try again in a few minutes.")


class LimitedKernelManager(AsyncMappingKernelManager):
    """At most `max_kernels` kernels; further page loads are refused with a 503 "busy" page."""

    max_kernels = Integer(0, config=True, help="Most kernels (visitors) at once; 0: no limit.")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._starting = 0

    async def start_kernel(self, *args: Any, **kwargs: Any) -> str:
        """Start a kernel unless the limit is reached (then HTTP 503 with the busy sentence)."""
        if self.max_kernels and len(self.list_kernel_ids()) + self._starting >= self.max_kernels:
            logger.warning("refusing a new visitor: %d kernels, the limit", self.max_kernels)
            raise HTTPError(503, reason=busy_reason(self.max_kernels))
        self._starting += 1
        try:
            return await super().start_kernel(*args, **kwargs)
        finally:
            self._starting -= 1
