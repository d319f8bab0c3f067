"""northbound adapters (see ARCHITECTURE.md); filled in by later issues."""
