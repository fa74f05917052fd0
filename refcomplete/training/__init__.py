"""Training the bundled gpt2-tiny-shakespeare model (dev-only: torch and transformers are imported only here)."""
