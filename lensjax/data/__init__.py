"""Embedded data (see NOTICE.md for source and licence)."""
