"""Makes the repository root importable for the tests (models, data, utils, cuda packages)."""
