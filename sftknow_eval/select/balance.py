"""Pure selection logic: balanced draws across relations and shares across categories."""

from __future__ import annotations

import random
from collections.abc import Sequence

PAPER_SIZES: tuple[int, ...] = (60, 120, 240, 480, 960, 1920)


def equal_shares(total: int, names: Sequence[str], rng: random.Random) -> dict[str, int]:
    """``total`` split as evenly as possible over ``names``; the remainder goes to a seeded
    random subset (so no relation is always the one that gets the extra item)."""
    base, extra = divmod(total, len(names))
    lucky = set(rng.sample(list(names), extra))
    return {name: base + (name in lucky) for name in names}


def balanced_quotas(available: dict[str, int], size: int, rng: random.Random) -> dict[str, int]:
    """How many items to draw from each group so the draw is as even as the groups allow.

    Water-filling: every group gets an equal share; a group with fewer items than its share
    gives all it has and the shortfall is shared among the others. Requires
    ``size <= sum(available)``.
    """
    if size > sum(available.values()):
        raise ValueError(f"cannot draw {size} from {sum(available.values())} items")
    quotas = {name: 0 for name in available}
    open_groups = sorted(name for name, count in available.items() if count > 0)
    remaining = size
    while remaining > 0:
        shares = equal_shares(remaining, open_groups, rng)
        remaining = 0
        still_open = []
        for name in open_groups:
            room = available[name] - quotas[name]
            take = min(room, shares[name])
            quotas[name] += take
            remaining += shares[name] - take
            if available[name] - quotas[name] > 0:
                still_open.append(name)
        open_groups = still_open
    return quotas
