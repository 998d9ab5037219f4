"""Shapes World: the embedded procedural world (its generator, pixel judge and evaluation), kept apart from the generic code."""
