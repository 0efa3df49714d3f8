"""Storage metering and billing: usage and cost as a pure function of the append-only ledger.

See docs/design-billing.md. Writers go through ``ledger``; everything else only reads.

- ``ledger``: appends ``usage_event`` rows (commit, end, TTL change, restore), the one write path;
- ``intervals``: the derived ``usage_interval`` / ``usage_day`` tables, refreshed by every ledger write
  in its transaction and rebuildable from the ledger;
- ``aggregates``: the SQL over those tables: exact byte-seconds per group and bucket, bytes stored at
  an instant;
- ``usage``: priced usage over a window and current usage per group (``UsageRow``, ``CurrentRow``);
- ``overview``: the admin overview (all tenants: current usage and daily usage in one statement);
- ``invoices``: monthly invoices, a rounded line per (run, kind), numbered, provisional or frozen, and
  the ended months still to freeze (the collector's ``invoices`` phase);
- ``billable``: which tenants are billed (all but operator tenants), applied by every aggregate;
- ``catalog``: present-state reads of the catalog (physical bytes, largest / expiring checkpoints);
- ``pricing``: prices per (tenant, kind); ``units``: time, bytes, money and the rounding rule.
"""
