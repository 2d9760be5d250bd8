"""The adapter catalog: immutable, verified adapter versions on any fsspec URL (local dir, S3).

    from farm.catalog import Catalog, AdapterVersion, AdapterRef, parse_ref
    cat = Catalog()                      # farm.settings.catalog_url(); Catalog(customer="acme") scopes it
    v = cat.publish("acme", "support", folder, {"metrics": {...}}, idempotency_key=job_id)
    v = cat.resolve("acme/support@prod"); path = cat.fetch(v)

Layout, guarantees and the publish protocol: docs/catalog.md. Nothing heavy is imported here.
"""

from farm.catalog.admin import ANY
from farm.catalog.catalog import Catalog
from farm.catalog.metadata import AdapterVersion
from farm.catalog.refs import AdapterRef, parse_ref

__all__ = ["ANY", "AdapterRef", "AdapterVersion", "Catalog", "parse_ref"]
