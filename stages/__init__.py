"""Thin Typer commands, one per pipeline stage: read params, call cba, write artifacts."""
