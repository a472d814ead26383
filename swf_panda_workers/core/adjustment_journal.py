"""The worker adjustments an earlier attempt of a run's scaling sub-flow
journaled, as a retried attempt meets them again in the run's history
(pure).

A retried sub-flow replays the run's stored events in order: the slice
results, and among them the adjustments the earlier attempt journaled
(``AdjustSent``, decided at ``decided_at`` on the results' clock, stored a
moment later). Its policy decides again on the same results. A decision that
asks for the size of the next journaled adjustment the replay has not read
yet is that adjustment decided again: it is not sent, and the journal entry,
a little further on, applies it to the run (its size, its cooldown from
``decided_at``). Once read, an entry is spent, so the run may ask for that
size again later (6 -> 4 -> 6); a decision the earlier attempt never
journaled is sent.

Why the next entry not read yet, rather than the entry decided at the same
moment: results that arrived between a decision and the storing of its entry
are replayed before the entry, while the plan still has the old size, so the
policy may take the same decision again a result later; and a decision the
earlier attempt took on an idle tick (no result) is taken again at the next
result. Both are still that one journaled adjustment.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from swf_panda_workers.core.effects import AdjustSent
from swf_panda_workers.core.messages import WorkerSize


@dataclass(frozen=True)
class AdjustmentJournal:
    # adjust_sent entries of the history not read yet, in the history's order
    ahead: tuple[AdjustSent, ...] = ()

    @classmethod
    def of(cls, history: Iterable[object]) -> AdjustmentJournal:
        """The journaled adjustments among a run's stored (decoded) events."""
        return cls(tuple(item for item in history if isinstance(item, AdjustSent)))

    def replays(self, size: WorkerSize) -> bool:
        """Whether a decision for ``size`` is the next journaled adjustment,
        decided again: not to be sent."""
        return bool(self.ahead) and self.ahead[0].size == size

    def read(self, item: object) -> AdjustmentJournal:
        """The replay has reached ``item``: a journaled adjustment is spent."""
        if not isinstance(item, AdjustSent) or item not in self.ahead:
            return self
        index = self.ahead.index(item)
        return AdjustmentJournal(self.ahead[:index] + self.ahead[index + 1 :])
