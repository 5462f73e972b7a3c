"""The normalizers: one small module each, all on the shared core."""
