"""Where outputs land, and the rules that keep them from destroying what merger did not make.

An output's path is relative to the job's output directory (a fresh one per
job), or absolute, or climbs out of it with `..`. Wherever it lands, before
anything is computed (in the pre-flight, and again when the job starts):

- it may not be one of the recipe's sources, lie inside a source folder, or
  be the same file as a source (links resolved): an output that replaced its
  own input would be merged into itself on every re-run;
- it may not lie inside the cache directory (a planted object would be
  served to later runs);
- an existing file there must be one merger wrote (it has merger's
  provenance), unless the output sets `overwrite: true` and the command line
  says `allow_overwrite=true` (a recipe alone never replaces a user's file);
  so must the `.json` beside a `.pth` output;
- a `.pth` output may not land in a folder Python reads `.pth` files from at
  start-up (site-packages, or any folder on sys.path): their `import` lines run;
- two outputs of one job, or of two jobs of a sweep, may not be the same file.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from merger.core.limits import MIB
from merger.core.regular_file import open_regular
from merger.core.strict_json import loads_strict
from merger.engine.provenance import SIDE_FILE_FIELD, Provenance
from merger.errors import MergerError, shown
from merger.recipe.model import OutputDef, Recipe

_CONTENT_KEY = re.compile(r"[0-9a-f]{64}")
SWEEP_FIX = (
    "put a swept variable in the path (e.g. 'blend_${alpha}.safetensors'), or use a relative path:"
    " each job has its own output directory"
)


@dataclass(frozen=True)
class OutputTarget:
    """One output's file (and side file), as absolute, normalised paths."""

    name: str
    path: Path
    side: Path | None
    outside: bool  # outside the job's output directory


def check_output_dir(output_dir: Path) -> None:
    """The job's output directory can be made: no file stands where one of its folders would be."""
    for folder in (output_dir, *output_dir.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise MergerError(
                    f"cannot make the output directory '{shown(output_dir)}': '{shown(folder)}' is a file",
                    where="hydra.run.dir / hydra.sweep.dir",
                    fix=f"move the file '{shown(folder)}' away, or run merger in another directory",
                )
            return


def output_targets(recipe: Recipe, output_dir: Path) -> list[OutputTarget]:
    base = Path(os.path.normpath(output_dir.absolute()))
    targets = []
    for output in recipe.outputs.values():
        path = Path(os.path.normpath(base / Path(output.path).expanduser()))
        side = Path(os.path.normpath(base / output.side_file)) if output.side_file else None
        targets.append(OutputTarget(output.name, path, side, not path.is_relative_to(base)))
    return targets


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _made_by_merger(path: Path) -> bool:
    """Whether an existing file carries merger's provenance, whole and well formed: a safetensors header
    with it, or for a `.pth` the `.json` beside it that names this very file by size and sha256."""
    from merger.io.safetensors_file import file_sha256
    from merger.io.safetensors_header import read_header

    if path.suffix == ".safetensors":
        try:
            return _is_merger_key(Provenance.from_metadata(read_header(path).metadata))
        except (MergerError, ValueError):
            return False
    if path.suffix == ".pth":
        side = _provenance_json(path.with_suffix(".json"))
        made = side.get(SIDE_FILE_FIELD) if side else None
        return (
            isinstance(made, dict)
            and made.get("bytes") == path.stat().st_size
            and made.get("sha256") == file_sha256(path)
        )
    return _provenance_json(path) is not None


#: the list of files merger wrote in a folder output, inside it: a re-run replaces such a folder only
#: while it holds exactly those files, unchanged (a file the user added or edited is never lost)
FOLDER_MANIFEST = ".merger-folder.json"
#: files up to this size are compared by sha256 with the manifest; larger ones (weights) by size
MANIFEST_HASHED_BYTES = 16 * MIB


def folder_not_mergers(folder: Path) -> str | None:
    """Why `folder` is not a folder output merger wrote and that is unchanged since; None when it is."""
    from merger.io.safetensors_file import file_sha256

    manifest = _manifest(folder / FOLDER_MANIFEST)
    if manifest is None:
        return "it has no merger manifest (.merger-folder.json)"
    extra, changed = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name == FOLDER_MANIFEST:
            continue
        listed = manifest.get(entry.name)
        if listed is None or entry.is_symlink() or not entry.is_file():
            extra.append(entry.name + ("/" if entry.is_dir() else ""))
        elif listed.get("bytes") != entry.stat().st_size or (
            entry.stat().st_size <= MANIFEST_HASHED_BYTES and listed.get("sha256") != file_sha256(Path(entry.path))
        ):
            changed.append(entry.name)
    if extra:
        return f"it holds files merger did not write ({', '.join(shown(n) for n in extra[:5])})"
    if changed:
        return f"files in it changed since merger wrote them ({', '.join(shown(n) for n in changed[:5])})"
    return None


def _manifest(path: Path) -> dict[str, dict[str, object]] | None:
    try:
        with open_regular(path) as f:
            raw = f.read(MIB + 1)
        data = loads_strict(raw, what="the folder manifest") if len(raw) <= MIB else None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("key"), str) or not _CONTENT_KEY.fullmatch(data["key"]):
        return None
    files = data.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return None
    return files


def _is_merger_key(provenance: Provenance | None) -> bool:
    return provenance is not None and _CONTENT_KEY.fullmatch(provenance.key) is not None


def _provenance_json(path: Path, field: str | None = None) -> dict[str, object] | None:
    """The provenance `.json` merger writes beside a `.pth` (or, `field` "metadata", the index of a
    sharded folder output, whose metadata holds the key), or None for any other file."""
    try:
        with open_regular(path) as f:
            raw = f.read(64 * MIB + 1)
        if len(raw) > (64 * MIB if field else MIB):
            return None
        data = loads_strict(raw, what="provenance")
        if field is not None:
            inner = data.get(field) if isinstance(data, dict) else None
            key = inner.get("merger.key") if isinstance(inner, dict) else None
            found = isinstance(data, dict) and isinstance(key, str) and _CONTENT_KEY.fullmatch(key)
            return data if found and isinstance(data, dict) else None
        if not isinstance(data, dict) or not _is_merger_key(Provenance.from_json(raw)):
            return None
    except (OSError, ValueError):
        return None
    return data


def _refuse(recipe: Recipe, output: OutputDef, what: str, fix: str) -> MergerError:
    return MergerError(what, where=recipe.where(f"outputs.{output.name}.path"), fix=fix)


def _check_nesting(recipe: Recipe, targets: Sequence[OutputTarget]) -> None:
    """No output inside another output (a folder's files belong to the folder: it is replaced whole)."""
    paths = [(t.name, Path(os.path.realpath(p))) for t in targets for p in (t.path, t.side) if p is not None]
    for name, path in paths:
        for other, outer in paths:
            if other != name and path != outer and path.is_relative_to(outer):
                raise _refuse(
                    recipe,
                    recipe.outputs[name],
                    f"output '{name}' would write '{shown(path)}', inside output '{other}' ('{shown(outer)}')",
                    "give each output its own place: a model folder is written, and replaced, whole",
                )


def check_output_targets(
    recipe: Recipe, targets: Sequence[OutputTarget], sources: Iterable[Path], cache_root: Path
) -> None:
    """Raise MergerError for the first output that would destroy something merger did not make."""
    source_paths = [Path(os.path.realpath(p)) for p in sources]
    source_ids = set()
    for path in source_paths:
        try:
            st = path.stat()
        except OSError:
            continue
        source_ids.add((st.st_dev, st.st_ino))
    cache = Path(os.path.realpath(cache_root))
    _check_nesting(recipe, targets)
    seen: dict[Path, str] = {}
    for target in targets:
        output = recipe.outputs[target.name]
        for path in [p for p in (target.path, target.side) if p is not None]:
            real = Path(os.path.realpath(path))
            if real in seen:
                raise _refuse(
                    recipe,
                    output,
                    f"output '{output.name}' writes '{path}', as output '{seen[real]}' does",
                    "give each output its own path",
                )
            seen[real] = output.name
            source = next((s for s in source_paths if _inside(real, s)), None)
            if source is None and real.exists() and (real.stat().st_dev, real.stat().st_ino) in source_ids:
                source = real
            if source is not None:
                raise _refuse(
                    recipe,
                    output,
                    f"output '{output.name}' would replace the source '{shown(source)}'",
                    "write the output somewhere else: an output never replaces one of the recipe's models",
                )
            if _inside(real, cache):
                raise _refuse(
                    recipe,
                    output,
                    f"output '{output.name}' would write '{shown(path)}', inside the cache '{cache}'",
                    "write outputs outside the cache directory (relative paths land in the job's output directory)",
                )
            folder = output.format == "folder" and path == target.path
            if (real.suffix == ".pth" and _is_site_dir(real.parent)) or (folder and _is_site_dir(real)):
                place = real if folder else real.parent
                raise _refuse(
                    recipe,
                    output,
                    f"output '{output.name}' would write '{shown(path)}'"
                    + ("" if folder else f" into '{shown(place)}'")
                    + ", a folder Python reads at start-up (it runs the import lines of .pth files there)",
                    "write the output somewhere else" + ("" if folder else ", or as .safetensors"),
                )
            _check_existing(recipe, output, path, real)


def _is_site_dir(folder: Path) -> bool:
    """A folder whose `.pth` files Python's `site` module reads, and runs lines of, at every start."""
    import site
    import sys

    if folder.name in ("site-packages", "dist-packages"):
        return True
    known = [*sys.path, *site.getsitepackages(), site.getusersitepackages()]
    return any(entry and Path(os.path.realpath(entry)) == folder for entry in known)


def _check_existing(recipe: Recipe, output: OutputDef, path: Path, real: Path) -> None:
    folder = output.format == "folder"
    if real.is_dir() and not folder:
        raise _refuse(recipe, output, f"output path '{shown(path)}' is a directory", "give the output a file path")
    if real.exists() and folder and not real.is_dir():
        raise _refuse(
            recipe,
            output,
            f"output '{output.name}' is a model folder, but '{shown(path)}' is a file",
            "choose another path (a folder output's path has no extension)",
        )
    if folder and path.is_symlink():
        raise _refuse(
            recipe,
            output,
            f"output '{output.name}' is a model folder, and '{shown(path)}' is a symbolic link",
            "give the folder's own path (merger replaces a folder whole, and never through a link)",
        )
    if folder and real.is_dir():
        why = None if not any(real.iterdir()) else folder_not_mergers(real)
        if why is None:
            return
        if not (output.overwrite and recipe.settings.allow_overwrite):
            raise _refuse(
                recipe,
                output,
                f"output '{output.name}' would replace the folder '{shown(path)}', and {why}",
                "choose another path, or move those files away (merger replaces a folder whole)",
            )
        return
    if not real.exists() or (output.overwrite and recipe.settings.allow_overwrite) or _made_by_merger(real):
        return
    what = f"output '{output.name}' would replace '{shown(path)}', a file merger did not write"
    if not output.overwrite:
        raise _refuse(recipe, output, what, "choose another path, or set overwrite: true on this output")
    raise _refuse(
        recipe,
        output,
        f"{what}; the output sets overwrite: true, which takes effect only with allow_overwrite=true",
        "if you mean to replace that file, run with allow_overwrite=true on the command line",
    )


def check_sweep_targets(recipe_of: Sequence[Recipe], targets_of: Sequence[Sequence[OutputTarget]]) -> None:
    """Every job of a sweep writes its own files."""
    owner: dict[Path, tuple[int, str]] = {}
    for job, targets in enumerate(targets_of):
        for target in targets:
            for path in [p for p in (target.path, target.side) if p is not None]:
                first = owner.setdefault(Path(os.path.realpath(path)), (job, target.name))  # links resolved
                if first[0] != job:
                    raise MergerError(
                        f"output '{target.name}' writes '{shown(path)}' in job {first[0]} and in job {job} of the"
                        " sweep: each job would replace the last one's output",
                        where=recipe_of[job].where(f"outputs.{target.name}.path"),
                        fix=SWEEP_FIX,
                    )


@dataclass(frozen=True)
class SweepJob:
    """A job of a sweep: the sweep's directory and the job's number."""

    sweep_dir: Path
    number: int


CLAIMS_FOLDER = ".merger-claims"


def claim_sweep_targets(recipe: Recipe, targets: Sequence[OutputTarget], job: SweepJob) -> None:
    """Claim each output file for this job of its sweep, as it starts: a file another job of the sweep
    claimed is refused (merger's sweeper checks the first jobs together before the sweep; this holds
    for every job, however many). A claim is a file in the sweep's own directory, made exclusively."""
    folder = job.sweep_dir / CLAIMS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for target in targets:
        for path in [p for p in (target.path, target.side) if p is not None]:
            real = os.path.realpath(path)
            claim = folder / hashlib.sha256(os.fsencode(real)).hexdigest()[:32]
            mine = f"{job.number}\n{real}\n".encode(errors="surrogateescape")
            try:
                with open(claim, "xb") as f:
                    f.write(mine)
                continue
            except FileExistsError:
                with open_regular(claim) as f:
                    theirs = f.read(64 * 1024)
            if theirs != mine:
                first = theirs.split(b"\n", 1)[0].decode(errors="replace")
                raise MergerError(
                    f"output '{target.name}' writes '{shown(path)}' in job {first} and in job {job.number} of"
                    " the sweep: this job would replace that one's output",
                    where=recipe.where(f"outputs.{target.name}.path"),
                    fix=SWEEP_FIX,
                )
