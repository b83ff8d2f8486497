"""Stage two: heads trained on cached features (train-heads), many at once (sweep), and their statistics."""
