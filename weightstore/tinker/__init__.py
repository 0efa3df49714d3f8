"""The core of the Tinker-compatible surface (``/api/v1``).

What the HTTP layer needs beyond the plain checkpoint and run functions. One public module per noun:

- ``runs``: which training runs a caller may see through Tinker's ``access_scope``.
- ``checkpoints``: which checkpoints a caller may see, publish / unpublish, ``weights_info``, and
  ``copy_weights`` (zero-copy: new rows over the same blobs, de-duplicated on its idempotency key).
- ``archive``: the legacy (SDK ≤ 0.35) tar of a checkpoint's adapter files.
- ``audit_log``: the admin audit listing, by Tinker's event types.
- ``sessions``: sessions, "models" (create-via-load) and futures of ``tinker checkpoint download``,
  each in its own table.

Catalog functions take ``session`` first and never commit; the few workflows (they interleave
object-store or export-job work with catalog steps) take ``ctx`` and say so in their docstring.
"""
