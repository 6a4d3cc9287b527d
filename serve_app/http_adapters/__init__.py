"""The HTTP edge of the ingress: reading requests, encoding results and errors.

Kept apart from ``serve_app/ingress.py`` (the deployment and its routes) so that each adapter is
one small module: :mod:`.errors` (client errors and parameter parsing), :mod:`.request_reading`
(multipart/JSON bodies), :mod:`.encoding` (result JSON and error responses).
"""
