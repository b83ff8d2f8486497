"""What every stage stands on: atomic writes, outputs, locks, state files, workers, processes, progress."""
