"""The ground floor: what every room uses. Tensor specs and dtypes, array backends (numpy and torch),
the documented limits on untrusted input, strict JSON, opening regular files, non-finite counting,
torch byte views, the version.

May import: nothing of merger but `merger.errors`.
"""
