"""Exercises and grading: build exercises from solutions; grade submissions with nbval."""
