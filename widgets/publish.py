"""A published dashboard in the app: the publisher's lock shown to visitors, and the queue for run slots."""

from __future__ import annotations

import contextlib
import html
from collections.abc import Callable, Iterator

from workbench.serve.publish import PublishPolicy
from workbench.serve.slots import RunSlots


def policy_note(policy: PublishPolicy | None) -> str:
    """One line telling a visitor what this server allows ("" when it is not locked)."""
    if policy is None:
        return ""
    return ("<div class='wb-note'>" + html.escape(
        f"Locked by its publisher: models {', '.join(policy.models)}; batch size up to {policy.max_batch_size}, "
        f"new tokens up to {policy.max_new_tokens}, held-out tokens up to {policy.max_eval_tokens}; files only "
        "from this server's working folder.") + "</div>")


def queue_message(place: int, slots: RunSlots) -> str:
    """What a waiting visitor reads."""
    ahead = "you are next" if place == 1 else f"{place - 1} ahead of you"
    runs = "one run" if slots.count == 1 else f"{slots.count} runs"
    return f"Waiting for a free run slot: place {place} in the queue ({ahead}; this server runs {runs} at once). " \
           "Stop leaves the queue."


@contextlib.contextmanager
def run_slot(slots: RunSlots | None, should_stop: Callable[[], bool],
             show: Callable[[str], None]) -> Iterator[bool]:
    """Hold a run slot for the `with` block (waiting in the queue first); yields False when stopped while waiting."""
    if slots is None:
        yield True
        return
    slot = slots.acquire(should_stop, lambda place: show(queue_message(place, slots)))
    if slot is None:
        yield False
        return
    with slot:
        yield True
