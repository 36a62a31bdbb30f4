"""Sources: where the items live and how their bytes reach the decoder."""
