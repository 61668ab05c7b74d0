"""Plugin endpoints: HTTP routes a plugin serves to the outside world under ``/e/{hook_id}/``.

- :mod:`daemon.endpoints.store`: the ``endpoints`` table and its queries, always per tenant.
- :mod:`daemon.endpoints.settings`: an endpoint's settings checked against the plugin's
  declaration, and masked for listings, as upstream does.
- :mod:`daemon.endpoints.routes`: ``/plugin/{tenant_id}/endpoint/*``, what Dify's API server calls.
- :mod:`daemon.endpoints.rawhttp`: the caller's request as the raw HTTP the SDK parses.
- :mod:`daemon.endpoints.hook`: the public ``/e/{hook_id}/{path}`` route and its relay.
"""
