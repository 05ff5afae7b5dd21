"""Request limits shared by the ASGI app and the server launcher (a leaf module: no cycle between them)."""

DEFAULT_MAX_BODY_BYTES = 8 * 2 ** 20
