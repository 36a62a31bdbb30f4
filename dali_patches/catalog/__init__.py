"""Catalog: the screened, indexed list of usable items, from their headers."""

__all__: list[str] = []
