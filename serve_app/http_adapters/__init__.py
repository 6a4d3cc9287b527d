"""The HTTP edge of the ingress: reading requests, encoding results and errors.

Kept apart from ``serve_app/ingress.py`` (the deployment and its routes) so that each adapter is
one small module: :mod:`.errors` (client errors and parameter parsing), :mod:`.request_reading`
(multipart/JSON bodies, read within their limits), :mod:`.encoding` (result JSON and the error
shape), :mod:`.request_ids` (the request id middleware), :mod:`.error_handling` (every exception as
the error shape) and :mod:`.openapi` (the documented bodies, responses and errors).
"""
