"""When a machine counts as busy: the rule the load tracker applies and the reports repeat."""

from __future__ import annotations

# The busy rule: a block is busy when other processes took more than this share of the CPU
# time our CPUs offered during it (0.10: more than 10%, say 0.2 core-seconds of a 1 s block on
# 2 cores). The load average is recorded but not used for the rule, because
# - our own worker counts in it: a worker running torch with 2 threads on 2 cores reads a
#   load of about 2 on an otherwise idle machine, so load cannot tell "we are busy" from
#   "someone else is busy" without knowing our thread count and how much of the block the
#   threads were runnable;
# - it is a 1-minute exponentially damped average sampled every 5 s, so it lags a block of
#   a few seconds and still remembers load that ended before the block began;
# - it counts tasks in uninterruptible sleep (disk I/O), which take no CPU.
# CPU time that other processes actually consumed on our cores during the block has none
# of these faults.
BUSY_OTHER_CPU_FRACTION = 0.10

# A run is flagged busy when more than this share of its measured blocks are busy: one or
# two blocks disturbed by a cron job are noise that medians absorb; more than 5% are not.
BUSY_RUN_BLOCK_FRACTION = 0.05


def is_busy(other_cpu_fraction: float, threshold: float = BUSY_OTHER_CPU_FRACTION) -> bool:
    """True when other processes took more than `threshold` of our CPUs' time in a block.

    `other_cpu_fraction` is `LoadWindow.other_cpu_fraction`: CPU seconds spent by every
    process except ours on the CPUs we may run on, divided by wall seconds × those CPUs.
    An unknown fraction (NaN, where /proc/stat is unreadable) is not busy; the window's
    warning says why it is unknown. See the comment on BUSY_OTHER_CPU_FRACTION for why the
    load average is not used.
    """
    return bool(other_cpu_fraction > threshold)  # False for NaN
