"""DrSpot components: one module per lifecycle stage, plain typed functions, no orchestration.

Importing this package applies the offline/telemetry settings (:mod:`components.env`) before any
library that would reach for the network is imported.
"""

from components import env as _env

_env.apply()

__version__ = "0.1.0"
