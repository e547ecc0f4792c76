"""Evaluation: FID (optional torch-fidelity), sharded resumable sampling, and paper tables."""
