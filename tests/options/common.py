"""Helpers of the option tests."""

from __future__ import annotations

import numpy as np


def layer_means(records, metric):
    """Per-layer mean over heads of one metric, [L]."""
    L = max(r["layer"] for r in records) + 1
    return np.array([np.mean([r[metric] for r in records if r["layer"] == l]) for l in range(L)])
