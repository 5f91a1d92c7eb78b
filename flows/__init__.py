"""DrSpot's Prefect flows and its command line; thin layers over :mod:`components`."""

import components  # noqa: F401  (applies the offline/telemetry settings first)
