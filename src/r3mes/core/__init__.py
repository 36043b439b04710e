"""Core model pieces: BitLinear, DoRA, the BitNet transformer, checkpoints."""
