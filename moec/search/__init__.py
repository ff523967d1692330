"""Bit-width search: the BitPlan format, cost function and policies."""
