"""Tenant administration and quotas (issue 12, parts 1 and 2)."""
