"""The commands: the Hydra app `merger` (pre-flight, merger's sweeper checks, Hydra error
translation, the recipe config source, the job itself), `merger-inspect`, `merger-cache`; how a
failure reaches the user.

May import: every room.
"""
