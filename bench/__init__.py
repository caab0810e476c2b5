"""Benchmarks of ARMT against full attention and Mamba: streaming prefill, generation, memory and MFU.

Run `python -m bench --help`. Every (model, length) measurement runs in a fresh subprocess (`bench.worker`) so that
its peak resident memory is its own.
"""
