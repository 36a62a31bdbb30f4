"""Engine: decoded images → the bounded cache → rounds of finished patch batches."""
