"""The Textual console (its own issue). It reads runs.db through engine.store and never imports torch."""
