"""The adapter registry: immutable versions in a store, indexed in a SQL catalog.

``store.py`` (bytes, local or S3), ``catalog.py`` (SQL), ``core.py`` (the ``Registry`` that
ties them), ``validate.py`` (what publish accepts), ``names.py`` (names and serve names),
``api.py`` (the HTTP app: auth, limits, errors) with its routes in ``routes/``, ``client.py``
(Python client).
"""

from farm.registry.core import NotFound, Registry, VersionInfo, open_registry
from farm.registry.names import parse_ref, serve_name
from farm.registry.validate import PublishError

__all__ = ["NotFound", "PublishError", "Registry", "VersionInfo", "open_registry", "parse_ref", "serve_name"]
