"""Distillation methods."""
