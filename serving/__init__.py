"""The BentoML service (built by the serving issue)."""
