"""Export: finished batches handed to DALI pipelines and training frameworks."""
