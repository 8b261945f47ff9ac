"""Quantization primitives: quantizer (pure functions), learnables, QuantLinear, blocks,
the decoder layer, and the run-time activation quantizers."""
