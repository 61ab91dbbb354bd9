"""A saga type with no domain app behind it: proof that the engine stands alone.

Installed by the test settings only. Its three steps touch nothing but the
saga's own rows, and its chaos and bench plug-in is a dozen lines: what a
project that lifts ``sagas/`` into itself would write for its first saga.
"""
