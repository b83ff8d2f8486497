"""Using a trained run: its directory, predictions, evaluation, ensembles, submissions, figures, imports."""
