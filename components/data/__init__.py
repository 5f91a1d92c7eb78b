"""The data phase: ingest, manifest, images, validation, de-duplication, split, the data gate, versioning."""
