"""`ts-convert`: checkpoint <-> Hugging Face conversion (see megatron_ts.hf.export/import_hf)."""
