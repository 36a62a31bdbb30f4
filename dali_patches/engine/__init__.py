"""Engine: decoded images → the bounded cache → rounds of finished patch batches."""

__all__: list[str] = []
