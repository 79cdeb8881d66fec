"""What the gateway's secrets look like: known here, below every app, so that any layer can
refuse to echo one back (common.rest.quoted_id) and budgets can mint them
(budgets/services/keys.py)."""

API_KEY_PREFIX = "gw-"
MASTER_KEY_PREFIX = "otari-mk-"
