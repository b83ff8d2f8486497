"""Stage one: run frozen encoders over a corpus once and keep what they compute in feature stores."""
