"""DrSpot's infrastructure: configuration, the state home and the offline settings, the compute backends (a local
pool or a Dask cluster) and the local production stack. The lifecycle steps live in :mod:`components`.

Importing this package applies the offline/telemetry settings (:mod:`infra.env`) before any library that would
reach for the network is imported.
"""

from infra import env as _env

_env.apply()
