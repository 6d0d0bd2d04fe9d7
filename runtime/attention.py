"""Attention helpers for generated modules (flash strategy). Pure torch."""
