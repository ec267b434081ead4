"""Audio encoders: log-mel (B, 1, T, F) -> clip embedding (B, out_dim)."""
