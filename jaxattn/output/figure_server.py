"""What the figure pool's ``forkserver`` imports before it forks a worker (:mod:`jaxattn.output.figure_pool`).

Importing this module is the server's start-up: it lowers the server's priority, then imports the
figures and warms matplotlib (the Agg backend, the fonts) once, so that every worker forked from
the server starts warm. At the lower priority the server takes only the cores the main process
leaves idle while it counts and derives; the workers inherit the priority, which is fine: by the
time they draw, the main process only waits for them.
"""

import os

if hasattr(os, "nice"):
    os.nice(10)

from jaxattn.output.figure_pool import warm_matplotlib  # noqa: E402  (after the priority: the imports are the work)

warm_matplotlib()
