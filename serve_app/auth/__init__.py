"""API keys, scopes and per-key quotas (``args.auth``; ``docs/auth.md``).

- :mod:`.keys`: making and hashing keys; :class:`~.keys.KeyStore` (config keys plus a key file
  re-read when it changes: rotation without a restart);
- :mod:`.quotas`: :class:`~.quotas.QuotaLedger`, every key's requests per minute, crops in flight
  and work units per hour (one for all ingress replicas);
- :mod:`.gate`: :class:`~.gate.AuthGate`, what an ingress replica asks (who, may they, is there
  quota left) and the fair queue's tenant of a key;
- :mod:`.http`: the FastAPI dependencies per scope and the OpenAPI security.

Without ``auth`` in the config nothing here runs: every route is open, as before.
"""

from serve_app.auth.gate import AuthError, AuthGate, Caller, QuotaLease, ledger_actor_config
from serve_app.auth.http import ADMIN, BUSY_RESPONSES, DETAIL, DETAIL_UNMETERED, install_auth

__all__ = [
    "ADMIN",
    "BUSY_RESPONSES",
    "DETAIL",
    "DETAIL_UNMETERED",
    "AuthError",
    "AuthGate",
    "Caller",
    "QuotaLease",
    "install_auth",
    "ledger_actor_config",
]
