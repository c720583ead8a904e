"""Differential privacy: the accountant (what ε a mechanism spends) on Google's dp-accounting."""
