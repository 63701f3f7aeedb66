"""The synthetic narrative world (world.py) and the embedded demo dataset built from it (demo.py)."""
