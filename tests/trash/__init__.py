"""Trash bin, restore by tinker path, run delete/show (issue 12, parts 4 and 5)."""
