"""DrSpot's lifecycle steps, plain typed functions with no orchestration, one floor per phase:

* :mod:`components.data` — ingest, manifest, images, validation, de-duplication, split, the data gate, versioning;
* :mod:`components.model` — classifier and detector training, evaluation and metrics, comparison, the MLflow
  registry, the model gate (promotion) and approval;
* :mod:`components.monitoring` — drift monitor, training reference, quality, OOD, feedback, review queue, alerts.

Importing this package applies the offline/telemetry settings (:mod:`infra`) before any library that would reach
for the network is imported.
"""

import infra  # noqa: F401  (offline settings first)

__version__ = "0.1.0"
