"""HTTP API and web page over an indexed collection: ``clipforge serve`` or ``create_app``."""
