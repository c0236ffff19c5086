"""Experiments: the stage driver (driver.py) and its stages (stages/: splits, teacher, generate,
align, report, caption), a run's evaluation, the report and the TPC-CMA sweep, the as-if-real
baseline. The top of the chain: may import every package; nothing but the entry points imports it.
"""
