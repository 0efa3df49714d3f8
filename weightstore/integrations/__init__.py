"""Integrations of weightstore with training frameworks (PyTorch Distributed Checkpoint: ``dcp``)."""
