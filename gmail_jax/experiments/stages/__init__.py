"""The stages of an experiment, one module each plus one line in ``driver.STAGES``.
Each reads its inputs from, and writes its outputs to, the workdir (driver.py says the protocol).
"""
