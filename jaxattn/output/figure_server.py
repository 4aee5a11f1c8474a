"""Imported first by the figure pool's ``forkserver`` (:mod:`jaxattn.output.figure_pool`): lowers its priority.

The server imports JAX and matplotlib while the main process counts and derives; at a lower
priority it takes only the cores the main process leaves idle. Its workers inherit the priority,
which is fine: by the time they draw, the main process only waits for them.
"""

import os

if hasattr(os, "nice"):
    os.nice(10)
