"""Pure rules of the memory guard: the limit in force, when to change concurrency,
and how to estimate memory between two full scans.

Nothing here imports Scrapy or psutil. Time is the ``now`` argument (monotonic
seconds), and memory is in MB of 1024 * 1024 bytes, the unit of Scrapy's
``MEMUSAGE_LIMIT_MB``. File contents are passed in, so every rule is tested
without a reactor, a process tree or a cgroup.

Concurrency rules (:class:`MemoryPolicy`), applied to each sample in order:

1. Above the hard limit, when one is set: close the spider, once.
2. Above the limit: lower concurrency to ``floor(concurrency * decrease_factor)``,
   at least one less than before and never below ``min_concurrency``. After a
   reduction, while memory stays above the limit, lower again only when it did
   not fall since the previous sample: a falling memory shows the last
   reduction working, because memory follows concurrency with a lag (requests
   in flight finish, callbacks release their objects). A fall smaller than
   ``FALL_TOLERANCE`` of the limit counts as no fall.
3. Above the limit at the minimum concurrency: when ``close_after_seconds`` is
   set and memory stayed above the limit at the minimum for that long, close
   the spider, once.
4. Below ``low_water_share * limit`` for ``restore_samples`` samples in a row,
   and concurrency lowered earlier: raise it by ``restore_step``, never above
   ``max_concurrency``. Each further step needs another full run of samples.
5. Between the low-water mark and the limit: keep concurrency, and start the
   run of low samples again.
"""

from __future__ import annotations

import enum
import math
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

#: Bytes in one MB, as Scrapy's ``MEMUSAGE_LIMIT_MB`` counts them.
MB = 1024 * 1024

#: The share of the limit by which memory must drop between two samples to
#: count as falling (rule 2), so measurement noise does not delay a reduction.
FALL_TOLERANCE = 0.01

#: A cgroup v1 limit file without a limit contains the largest page-aligned
#: 64-bit value, near 2**63. Any value this large means no limit.
UNLIMITED_BYTES = 2**60


class Action(str, enum.Enum):
    LOWER = "lower"
    RAISE = "raise"
    CLOSE = "close"


class Change(NamedTuple):
    """The guard's decision after one sample.

    For :attr:`Action.CLOSE`, ``reason`` is the spider's finish reason and the
    concurrency does not change.
    """

    action: Action
    old_concurrency: int
    new_concurrency: int
    reason: str = ""


#: Finish reason when memory went above ``hard_limit_mb``.
REASON_HARD_LIMIT = "resilience_memory_hard_limit"
#: Finish reason when memory stayed above the limit at the minimum concurrency.
REASON_NOT_FREED = "resilience_memory_not_freed"


@dataclass(frozen=True, slots=True)
class MemoryPolicyConfig:
    """Thresholds of :class:`MemoryPolicy`; memory in MB, time in seconds.

    ``hard_limit_mb`` and ``close_after_seconds`` are None when switched off.
    """

    limit_mb: float
    max_concurrency: int
    min_concurrency: int = 1
    low_water_share: float = 0.8
    restore_samples: int = 3
    decrease_factor: float = 0.5
    restore_step: int = 1
    hard_limit_mb: float | None = None
    close_after_seconds: float | None = None

    def __post_init__(self) -> None:
        """Raise ValueError naming the first field out of its range."""
        checks = (
            ("limit_mb", self.limit_mb > 0, "above 0"),
            ("min_concurrency", self.min_concurrency >= 1, "at least 1"),
            ("low_water_share", 0 < self.low_water_share < 1, "above 0 and below 1"),
            ("restore_samples", self.restore_samples >= 1, "at least 1"),
            ("decrease_factor", 0 < self.decrease_factor < 1, "above 0 and below 1"),
            ("restore_step", self.restore_step >= 1, "at least 1"),
        )
        for field, valid, rule in checks:
            if not valid:
                raise ValueError(
                    f"MemoryPolicyConfig.{field} must be {rule}, got {getattr(self, field)!r}"
                )

    @property
    def low_water_mb(self) -> float:
        """The memory under which samples count toward a restoration, in MB."""
        return self.low_water_share * self.limit_mb


class MemoryPolicy:
    """Decide from memory samples when to lower, raise or give up.

    Counters (``reductions``, ``restorations``, ``lowest_concurrency`` and
    ``peak_mb``) describe the whole crawl, for stats.
    """

    def __init__(self, config: MemoryPolicyConfig) -> None:
        self.config = config
        self.reductions = 0
        self.restorations = 0
        self.lowest_concurrency: int | None = None
        self.peak_mb = 0.0
        self.low_samples = 0
        self.closing = False
        # Whether concurrency is below what this policy found before lowering
        # it: only what the guard took away is given back.
        self.reduced = False
        self._stuck_since: float | None = None
        # The previous sample, while memory stays above the limit after a
        # reduction; None otherwise (rule 2).
        self._lowered_above_mb: float | None = None

    def observe(
        self, memory_mb: float, concurrency: int, now: float, limit_mb: float | None = None
    ) -> Change | None:
        """Apply the rules to one sample and return the change to make, if any.

        ``concurrency`` is the downloader's current total concurrency, and
        ``limit_mb`` overrides the configured limit for this sample (the guard
        lowers it when the system runs short of memory).
        """
        config = self.config
        limit = config.limit_mb if limit_mb is None else limit_mb
        self.peak_mb = max(self.peak_mb, memory_mb)
        if self.closing:
            return None

        if config.hard_limit_mb is not None and memory_mb > config.hard_limit_mb:
            return self._close(concurrency, REASON_HARD_LIMIT)

        if memory_mb > limit:
            self.low_samples = 0
            return self._above_limit(memory_mb, limit, concurrency, now)

        self._stuck_since = None
        self._lowered_above_mb = None
        if memory_mb >= config.low_water_share * limit:
            self.low_samples = 0
            return None

        self.low_samples += 1
        if self.low_samples < config.restore_samples:
            return None
        self.low_samples = 0
        return self._restore(concurrency)

    def _above_limit(
        self, memory_mb: float, limit_mb: float, concurrency: int, now: float
    ) -> Change | None:
        config = self.config
        previous_mb = self._lowered_above_mb
        if previous_mb is not None:
            self._lowered_above_mb = memory_mb
            if memory_mb < previous_mb - FALL_TOLERANCE * limit_mb:
                return None

        if concurrency > config.min_concurrency:
            self._stuck_since = None
            self._lowered_above_mb = memory_mb
            lowered = min(concurrency - 1, math.floor(concurrency * config.decrease_factor))
            new = max(config.min_concurrency, lowered)
            self.reductions += 1
            self.reduced = True
            self._note_concurrency(new)
            return Change(Action.LOWER, concurrency, new)

        self._note_concurrency(concurrency)
        if config.close_after_seconds is None:
            return None
        if self._stuck_since is None:
            self._stuck_since = now
        if now - self._stuck_since >= config.close_after_seconds:
            return self._close(concurrency, REASON_NOT_FREED)
        return None

    def _restore(self, concurrency: int) -> Change | None:
        config = self.config
        if not self.reduced or concurrency >= config.max_concurrency:
            self.reduced = False
            return None
        new = min(config.max_concurrency, concurrency + config.restore_step)
        self.restorations += 1
        if new >= config.max_concurrency:
            self.reduced = False
        return Change(Action.RAISE, concurrency, new)

    def _close(self, concurrency: int, reason: str) -> Change:
        self.closing = True
        return Change(Action.CLOSE, concurrency, concurrency, reason)

    def _note_concurrency(self, concurrency: int) -> None:
        if self.lowest_concurrency is None or concurrency < self.lowest_concurrency:
            self.lowest_concurrency = concurrency


class TreeMemoryEstimate:
    """Estimate the process tree's memory from a cheap RSS sum between full scans.

    A full scan (PSS or USS of every process) is exact but costs several times
    more than summing RSS. Between two full scans the estimate is the last full
    value plus the change of the RSS sum since then. Growth counts in full,
    because new memory is mostly private. A fall counts scaled by the last
    full/RSS ratio, because shared pages make RSS fall faster than PSS. The
    estimate therefore errs high rather than low.
    """

    def __init__(self, full_scan_interval: float) -> None:
        self.full_scan_interval = full_scan_interval
        self.full_mb: float | None = None
        self.rss_mb_at_full = 0.0
        self.full_at = -math.inf

    def calibrate(self, full_mb: float, rss_mb: float, now: float) -> None:
        """Store the result of a full scan taken at ``now`` with the RSS sum beside it."""
        self.full_mb = full_mb
        self.rss_mb_at_full = rss_mb
        self.full_at = now

    def estimate(self, rss_mb: float) -> float | None:
        """Return the estimated memory in MB, or None before the first full scan."""
        if self.full_mb is None:
            return None
        change = rss_mb - self.rss_mb_at_full
        if change < 0 and self.rss_mb_at_full > 0:
            change *= self.full_mb / self.rss_mb_at_full
        return max(0.0, self.full_mb + change)

    def full_scan_due(self, rss_mb: float, now: float, low_water_mb: float, reduced: bool) -> bool:
        """Whether the next sample needs a full scan.

        A full scan is due before the first estimate, after
        ``full_scan_interval`` seconds, and when the estimate reaches the
        low-water mark, so every decision to lower or close rests on a full
        scan. It is also due while concurrency is lowered, so every decision to
        raise it does too.
        """
        estimate = self.estimate(rss_mb)
        if estimate is None or reduced:
            return True
        if now - self.full_at >= self.full_scan_interval:
            return True
        return estimate >= low_water_mb


def effective_limit_mb(
    limit_mb: float, memory_mb: float, available_mb: float | None, min_available_mb: float
) -> float:
    """Return the limit for one sample, lowered when the system runs short of memory.

    With ``min_available_mb`` above 0, the job may grow only by what leaves
    ``min_available_mb`` of the system's available memory free:
    ``memory_mb + available_mb - min_available_mb``. The result is at least
    1 MB, so a system already short of memory counts as over the limit.
    """
    if min_available_mb <= 0 or available_mb is None:
        return limit_mb
    return max(1.0, min(limit_mb, memory_mb + available_mb - min_available_mb))


# cgroup memory limits


class Mount(NamedTuple):
    """One line of ``/proc/self/mountinfo``: the fields the limit search needs."""

    root: str
    mount_point: str
    filesystem: str
    super_options: tuple[str, ...]


class CgroupEntry(NamedTuple):
    """One line of ``/proc/self/cgroup``: ``hierarchy:controllers:path``."""

    hierarchy: int
    controllers: tuple[str, ...]
    path: str


class CgroupLimit(NamedTuple):
    """A cgroup memory limit that applies to this process.

    ``version`` is 1 or 2, ``path`` the file the limit was read from, and
    ``limit_bytes`` the limit itself.
    """

    version: int
    path: str
    limit_bytes: int

    @property
    def limit_mb(self) -> float:
        return self.limit_bytes / MB


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse ``/proc/self/mountinfo`` (see proc(5)); skip malformed lines.

    A line is ``id parent major:minor root mount_point options [optional...] -
    filesystem source super_options``; the octal escapes of paths (``\\040`` for
    a space) are decoded.
    """
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        separator = fields.index("-")
        if separator < 6 or len(fields) < separator + 4:
            continue
        mounts.append(
            Mount(
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                filesystem=fields[separator + 1],
                super_options=tuple(fields[separator + 3].split(",")),
            )
        )
    return mounts


def parse_proc_cgroup(text: str) -> list[CgroupEntry]:
    """Parse ``/proc/self/cgroup`` (see cgroups(7)); skip malformed lines."""
    entries = []
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        controllers = tuple(name for name in parts[1].split(",") if name)
        entries.append(CgroupEntry(int(parts[0]), controllers, parts[2]))
    return entries


def find_cgroup_memory_limit(
    proc_cgroup: str, mountinfo: str, read: Callable[[str], str | None]
) -> CgroupLimit | None:
    """Return the lowest cgroup memory limit that applies to this process, or None.

    ``proc_cgroup`` and ``mountinfo`` are the contents of ``/proc/self/cgroup``
    and ``/proc/self/mountinfo``; ``read(path)`` returns a file's text or None
    when it cannot be read. Directories come from those two files, never from a
    fixed path. A v1 memory hierarchy gives ``min(memory.limit_in_bytes,
    hierarchical_memory_limit of memory.stat)``. A v2 hierarchy gives the lowest
    ``memory.max`` of the process's cgroup and its ancestors up to the mount
    point. When both exist (a hybrid set-up), the lower limit wins.
    """
    entries = parse_proc_cgroup(proc_cgroup)
    mounts = parse_mountinfo(mountinfo)
    found = [
        limit
        for limit in (_v1_limit(entries, mounts, read), _v2_limit(entries, mounts, read))
        if limit is not None
    ]
    return min(found, key=lambda limit: limit.limit_bytes, default=None)


def _v1_limit(
    entries: list[CgroupEntry], mounts: list[Mount], read: Callable[[str], str | None]
) -> CgroupLimit | None:
    entry = next((entry for entry in entries if "memory" in entry.controllers), None)
    if entry is None:
        return None
    candidates = [
        mount
        for mount in mounts
        if mount.filesystem == "cgroup" and "memory" in mount.super_options
    ]
    directory = _cgroup_directory(entry.path, candidates)
    if directory is None:
        return None

    limits = []
    limit_path = posixpath.join(directory, "memory.limit_in_bytes")
    own = _parse_bytes(read(limit_path))
    if own is not None:
        limits.append(CgroupLimit(1, limit_path, own))
    stat_path = posixpath.join(directory, "memory.stat")
    hierarchical = _stat_value(read(stat_path), "hierarchical_memory_limit")
    if hierarchical is not None:
        limits.append(CgroupLimit(1, stat_path, hierarchical))
    return min(limits, key=lambda limit: limit.limit_bytes, default=None)


def _v2_limit(
    entries: list[CgroupEntry], mounts: list[Mount], read: Callable[[str], str | None]
) -> CgroupLimit | None:
    entry = next((entry for entry in entries if entry.hierarchy == 0), None)
    if entry is None:
        return None
    candidates = [mount for mount in mounts if mount.filesystem == "cgroup2"]
    directory = _cgroup_directory(entry.path, candidates)
    if directory is None:
        return None
    mount_point = next(
        posixpath.normpath(mount.mount_point)
        for mount in candidates
        if _is_within(directory, mount.mount_point)
    )

    # A limit on any ancestor also binds this cgroup.
    lowest: CgroupLimit | None = None
    while True:
        path = posixpath.join(directory, "memory.max")
        limit = _parse_bytes(read(path))
        if limit is not None and (lowest is None or limit < lowest.limit_bytes):
            lowest = CgroupLimit(2, path, limit)
        if directory == mount_point or not _is_within(directory, mount_point):
            return lowest
        directory = posixpath.dirname(directory)


def _cgroup_directory(cgroup_path: str, mounts: list[Mount]) -> str | None:
    """Return the directory of ``cgroup_path`` under the first mount that contains it."""
    for mount in mounts:
        root = mount.root.rstrip("/") or "/"
        if root == "/":
            relative = cgroup_path
        elif cgroup_path == root or cgroup_path.startswith(root + "/"):
            relative = cgroup_path[len(root) :]
        else:
            continue
        directory = posixpath.normpath(posixpath.join(mount.mount_point, relative.lstrip("/")))
        if _is_within(directory, mount.mount_point):
            return directory
    # NOTE: a cgroup outside every mount's root (seen in containers without a
    # cgroup namespace that mount only their own subtree) falls back to the
    # mount point itself, which is that subtree on the set-ups checked so far.
    if mounts:
        return posixpath.normpath(mounts[0].mount_point)
    return None


def _is_within(directory: str, mount_point: str) -> bool:
    mount_point = posixpath.normpath(mount_point)
    return directory == mount_point or directory.startswith(mount_point.rstrip("/") + "/")


def _parse_bytes(text: str | None) -> int | None:
    """Return a limit file's value in bytes, or None for ``max``, no limit or an
    unreadable value."""
    if text is None:
        return None
    value = text.strip()
    if not value.isdigit():
        return None
    number = int(value)
    if number <= 0 or number >= UNLIMITED_BYTES:
        return None
    return number


def _stat_value(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return _parse_bytes(value)
    return None


def _unescape(path: str) -> str:
    """Decode the ``\\ooo`` octal escapes that mountinfo uses for spaces and the like."""
    if "\\" not in path:
        return path
    decoded = []
    index = 0
    while index < len(path):
        chunk = path[index + 1 : index + 4]
        if path[index] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            decoded.append(chr(int(chunk, 8)))
            index += 4
        else:
            decoded.append(path[index])
            index += 1
    return "".join(decoded)
