"""Export: finished batches handed to DALI pipelines and training frameworks."""

__all__: list[str] = []
