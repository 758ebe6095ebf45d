"""Shared prompt prefixes in the simulator: what an engine's prefix cache saves, per row.

vLLM's prefix cache skips the prefill of a prompt's prefix when a recent request held the same
prefix and its KV blocks have not been evicted since. The simulator models this with per-row
prefix ids, not per-row events: rows get a prefix group (drawn to match what the job's input
sample shows: how many rows share a prefix, how many distinct prefixes the whole input holds,
how long they are), are put in the order the scheduler deals them (input order, or prefix order:
sorted by group within windows), and a row's prefix counts as cached when the previous row of
its group lies at most `cache_rows` positions before it (the rows whose KV the cache holds
meanwhile). Rows run in that order on an instance's engine (units are ranges of positions, and
with prefix order an instance follows on from its last unit), so the distance in positions is
how recently the instance held the prefix. A cached row's prompt cost drops by its prefix
tokens; the result is each row's uncached prompt length, which `RowWork` prices as usual, so a
unit's cost stays a difference of prefix sums.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# KV tokens one instance's cache holds when nothing says otherwise: about what an 80 GB GPU
# keeps for an 8B model in bf16 after its weights (128 KiB a token).
DEFAULT_CACHE_TOKENS = 262_144


@dataclass(frozen=True)
class PrefixProfile:
    """Shared prefixes of a job's input, as its sample shows them."""

    shared_frac: float  # rows whose prefix another row shares
    groups: float  # distinct shared prefixes in the whole input (estimated)
    prefix_frac: float  # part of a sharing row's prompt that is its shared prefix
    grouped_input: bool  # the input already keeps rows of a prefix together

    @classmethod
    def from_keys(cls, keys: Sequence[Sequence[str]], total_rows: int,
                  lead_chars: int = 256) -> PrefixProfile | None:
        """From the ordering keys of a sample's chunks of consecutive rows (see
        `hetbatch.io.prefix_order`); None when no sampled rows share a prefix."""
        rows = [k for chunk in keys for k in chunk]
        leads = Counter(k[:lead_chars] for k in rows if len(k) >= lead_chars)
        sharing = {lead for lead, n in leads.items() if n > 1}
        if not rows or not sharing:
            return None
        shared_rows = [k for k in rows if len(k) >= lead_chars and k[:lead_chars] in sharing]
        # Distinct prefixes in the whole input: Chao1 from the sample's singletons and
        # doubletons (a sample of a few thousand rows sees only some of many documents).
        f1 = sum(1 for n in leads.values() if n == 1)
        f2 = sum(1 for n in leads.values() if n == 2)
        seen = len(leads)
        groups = seen + (f1 * f1 / (2 * f2) if f2 else 0.0)
        scale = total_rows / max(len(rows), 1)
        # Rows seen once in the sample may share with unseen rows: count them as sharing when
        # the estimate says prefixes repeat in the whole input.
        per_group = total_rows / max(groups, 1.0)
        shared = len(shared_rows) + (f1 if per_group >= 2 and scale > 1 else 0)
        by_lead: dict[str, list[str]] = {}
        for k in shared_rows:
            by_lead.setdefault(k[:lead_chars], []).append(k)
        fracs = [_common_prefix(ks) / max(len(k), 1) for ks in by_lead.values() for k in ks]
        pairs = sum(max(len(c) - 1, 0) for c in keys)
        together = sum(
            a[:lead_chars] == b[:lead_chars] and len(a) >= lead_chars
            for c in keys for a, b in itertools.pairwise(c)
        ) / max(pairs, 1)
        frac = min(shared / len(rows), 1.0)
        return cls(frac, min(groups, float(total_rows)), float(np.mean(fracs)),
                   together >= frac / 2)

    def cached_prompt(
        self, input_lens: np.ndarray, rng: np.random.Generator, window_rows: int | None,
        cache_rows: int, block_tokens: int = 16,
    ) -> np.ndarray:
        """Each row's prompt tokens left to prefill, in dealing order (`window_rows`: prefix
        order's windows, None for input order), with a cache that holds `cache_rows` rows."""
        n = len(input_lens)
        shares = rng.random(n) < self.shared_frac
        group = np.where(shares, rng.integers(0, max(math.ceil(self.groups), 1), n), -1)
        if self.grouped_input or window_rows:
            w = window_rows or n
            # Stable within windows: rows of a prefix together, ties in input order.
            keys = (np.arange(n) // w) * (int(group.max()) + 2) + (group + 1)
            group = group[np.argsort(keys, kind="stable")]
        order = np.argsort(group, kind="stable")  # positions by group, in position order
        same = np.zeros(n, dtype=bool)
        g = group[order]
        follows = (g[1:] == g[:-1]) & (g[1:] >= 0)
        near = np.diff(order) <= cache_rows
        same[order[1:]] = follows & near
        prefix = np.floor(input_lens * self.prefix_frac / block_tokens) * block_tokens
        saved = np.where(same, np.minimum(prefix, input_lens - 1), 0)
        return (input_lens - saved).astype(np.int64)


def cache_rows(cache_tokens: float, input_len: float, output_len: float) -> int:
    """Rows whose KV a cache of `cache_tokens` holds (prompt and output each)."""
    return max(1, int(cache_tokens / max(input_len + output_len, 1.0)))


def _common_prefix(keys: list[str]) -> int:
    lo, hi = min(keys), max(keys)  # the common prefix of all is that of the extremes
    n = 0
    for a, b in zip(lo, hi, strict=False):
        if a != b:
            break
        n += 1
    return n
