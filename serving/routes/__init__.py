"""The service's public routes by concern, each an ``APIRouter`` that ``serving/service.py`` mounts; a route reaches
the running service (models, log, pipeline) through BentoML's ``get_current_service``."""
