"""HF <-> Megatron-core conversion, built in: one mapping table (table.py), what its kinds mean for
tensors (shards.py), streaming HF and Megatron-core files (hf_io.py, mcore_io.py), and the two
directions as commands (engine.py, `python -m services.trainer.convert hf-to-mcore|mcore-to-hf`)."""
