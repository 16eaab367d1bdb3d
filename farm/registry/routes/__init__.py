"""The registry API's routes, one ``APIRouter`` per module; ``api.create_app`` includes them.

``ops`` (health, metrics), ``versions`` (search, read, download, archive, delete), ``aliases``,
``uploads`` (publish), ``admin`` (gc, reindex); ``deps`` holds the shared dependencies and
``models`` the request and response models.
"""
