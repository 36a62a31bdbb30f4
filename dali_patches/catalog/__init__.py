"""Catalog: the screened, indexed list of usable items, from their headers."""
