"""Which request matters more: the order of the scheduler's queues and its preemptions.

Smaller keys are more important: the request's priority, less one level for every
`aging_s` seconds it has spent waiting (queued, or preempted), then its arrival. The
aging keeps a flood of more important work from starving a request forever; as all
queued requests age alike, a queue kept in key order stays in order as time passes.
"""

from collections import deque

from engine.sequence import SequenceGroup


class Importance:
    def __init__(self, aging_s: float | None) -> None:
        self.aging_s = aging_s

    def key(self, group: SequenceGroup, now: float) -> tuple[float, float]:
        waited = group.waited_s
        if group.queued_since is not None:
            waited += now - group.queued_since
        earned = waited / self.aging_s if self.aging_s else 0.0
        return (group.priority - earned, group.arrival_time)

    def before(self, a: SequenceGroup, b: SequenceGroup, now: float) -> bool:
        """Whether a is more important than b."""
        return self.key(a, now) < self.key(b, now)

    def enqueue(self, queue: deque[SequenceGroup], group: SequenceGroup, now: float) -> None:
        """Start (or go on) counting the group's wait, and insert it in key order; the
        common case appends at the tail."""
        if group.queued_since is None:
            group.queued_since = now
        key = self.key(group, now)
        i = len(queue)
        while i and self.key(queue[i - 1], now) > key:
            i -= 1
        queue.insert(i, group)

    @staticmethod
    def dequeued(group: SequenceGroup, now: float) -> None:
        """The group runs again: bank the wait that just ended."""
        if group.queued_since is not None:
            group.waited_s += now - group.queued_since
            group.queued_since = None
