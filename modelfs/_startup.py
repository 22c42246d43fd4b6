"""What the `modelfs` process sets before the modules it runs are imported.

httpx imports its own command-line client whenever click and rich are installed
(with pygments: half of `import httpx`, ~30 ms of every start). modelfs never runs
it, and httpx falls back to a stub when that import fails. Only the command line
imports this module: a program that imports modelfs as a library keeps httpx as
it is.
"""

import sys

sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
