"""Quantization primitives: quantizer, QuantLinear, channel scaling, decoder layer."""
