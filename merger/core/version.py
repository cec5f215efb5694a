"""merger's version (pyproject.toml says the same): written into every output's provenance."""

VERSION = "0.1.0"
