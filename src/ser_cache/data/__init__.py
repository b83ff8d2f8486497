"""Corpora and what they hold: the readers (MSP-Podcast, manifests), audio, transcripts, a synthetic corpus."""
