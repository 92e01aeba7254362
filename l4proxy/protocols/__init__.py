"""Sans-IO protocol code: bytes in, events or bytes out; no sockets, no trio.

Every module here parses or produces a wire format (the TLS ClientHello today; the
PROXY protocol and the cleartext preambles of PostgreSQL, SMTP, IMAP and POP3 next)
and never does I/O: the trio layers feed it bytes and act on what it returns. ruff's
banned-api rule (TID251, configured in this folder's ``ruff.toml``) rejects imports of
trio, socket, ssl, OpenSSL, select, selectors and asyncio here, so the rule is checked.
"""
