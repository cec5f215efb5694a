"""The content-addressed store: objects and their records, locks, quarantine, collection and
verification; content keys and the hashes they are made of; the source memo; atomic files.

May import: merger.core, merger.io.
"""
