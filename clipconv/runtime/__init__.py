"""Leaves every other module may use: atomic file io, torchrun ranks, seeding, progress, memory settings."""
