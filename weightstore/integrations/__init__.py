"""Integrations of weightstore with training frameworks: PyTorch Distributed Checkpoint storage
(``dcp``) and the export of LoRA adapters saved through it (``dcp_lora``)."""
