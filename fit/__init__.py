"""Quantitative-MRI fitting (installed as ``epgx.fit``): MOLLI T1 and dictionary matching.

Nothing is exported yet; the fitters build on the simulation engines in :mod:`epgx`.
"""
