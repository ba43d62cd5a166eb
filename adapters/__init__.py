"""Adapters between the torus-sparse core and the frameworks users already run (installed as `torus_adapters`)."""
