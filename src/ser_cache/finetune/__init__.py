"""The online path: an encoder fine-tuned end to end with stage two's heads, resumable."""
