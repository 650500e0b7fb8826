"""Attacks to evaluate against: triggers and PoisonedEncoder (PE-I, PE-II)."""
