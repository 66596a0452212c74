"""The benchmark's sections and what they share; scripts/benchmark.py drives them."""
