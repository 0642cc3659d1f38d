"""Benchmarks of fpn_tf against torchvision (``python bench/benchmark.py --help``)."""
