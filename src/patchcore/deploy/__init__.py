"""Deployment: the one prediction path (:mod:`.inference`) that ``patchcore predict``, the service and the
exporter share."""
