"""One job, start to end: recipe data -> Recipe -> Graph -> Plan -> Executor ->
outputs and report. The CLI's pre-flight runs `prepare` alone (validation
before any tensor is read); a job runs both steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from merger.cache.store import Cache, cache_location
from merger.core.nonfinite import describe
from merger.engine.catalog import SourceCatalog, SpecsSeen
from merger.engine.executor import Executor, NodeResult
from merger.engine.folder_facts import FolderFacts, folder_facts
from merger.engine.folder_files import describe_left_out
from merger.engine.folder_output import place_folder
from merger.engine.graph import build_graph
from merger.engine.model_card import CardContext
from merger.engine.output_targets import (
    OutputTarget,
    SweepJob,
    check_output_dir,
    check_output_targets,
    claim_sweep_targets,
    output_targets,
)
from merger.engine.placement import OutputResult, place_output
from merger.engine.plan import Plan, build_plan
from merger.engine.progress import human_size
from merger.errors import MergerError
from merger.ops.registry import OpRegistry
from merger.recipe.model import build_recipe
from merger.report.evaluate import measure
from merger.report.evaluation_inputs import EvaluationPlan, evaluation_plan
from merger.report.html_report import write_html_report
from merger.report.preview import PreviewImage, check_preview_sizes, preview_images, render
from merger.report.run_report import RunContext, build_report, summary, write_report
from merger.report.sanity import check_nodes, run_device
from merger.report.sweep_summary import one_job_summary

log = logging.getLogger("merger")


@dataclass(frozen=True)
class Prepared:
    plan: Plan
    catalog: SourceCatalog
    cache: Cache
    previews: list[PreviewImage]
    targets: list[OutputTarget] | None  # where the outputs land, when the output directory was known
    max_cache_bytes: int | None  # cache_max_size: collect the cache to this size after the run
    folders: dict[str, FolderFacts] = field(default_factory=dict)  # folder outputs: config, card facts
    warnings: tuple[str, ...] = ()  # the plan's, and the outputs' (said once, before the run)
    evaluation: EvaluationPlan | None = None  # what each output is measured on (merger.report.evaluation_inputs)

    def source_files(self) -> list[Path]:
        return [f for h in self.catalog.all() for f in (h.location.path, *h.location.files)]

    def check_targets(self, output_dir: Path) -> list[OutputTarget]:
        """The outputs' files in `output_dir`, checked (see merger.engine.output_targets)."""
        check_output_dir(output_dir)
        targets = output_targets(self.plan.recipe, output_dir)
        check_output_targets(self.plan.recipe, targets, self.source_files(), self.cache.root)
        return targets


def prepare(
    data: Mapping[str, Any],
    registry: OpRegistry,
    *,
    file: str,
    launch_dir: Path,
    seen: SpecsSeen | None = None,
    output_dir: Path | None = None,
) -> Prepared:
    """Validate everything that can be checked from specs alone; reads no tensor data.

    `seen` shares the specs of files already opened between the jobs of one pre-flight;
    with `output_dir`, the outputs' places are checked too.
    """
    recipe = build_recipe(data, registry, file=file)
    graph = build_graph(recipe)
    if recipe.settings.device.startswith("cuda"):
        from merger.core.arrays import check_cuda

        try:
            check_cuda(recipe.settings.device)
        except MergerError as e:
            raise e.located(file) from None
    cache = Cache(cache_location(recipe.settings.cache_dir, launch_dir), verify=recipe.settings.cache_verify)
    previews = preview_images(recipe, launch_dir)
    catalog = SourceCatalog(recipe, launch_dir, cache.memo, seen)
    try:
        plan = build_plan(recipe, graph, catalog, registry)
        check_preview_sizes(plan, previews)  # each image as each image model gets it
        max_bytes = None
        if recipe.settings.cache_max_size is not None:
            from merger.cache.listing import max_size_setting

            max_bytes = max_size_setting(recipe.settings.cache_max_size)
        folders: dict[str, FolderFacts] = {}
        warnings = list(plan.warnings)
        for output in recipe.outputs.values():
            if output.format == "folder":
                folders[output.name], more = folder_facts(plan, output)
                warnings.extend(w for w in more if w not in warnings)  # said once per node
        evaluation = evaluation_plan(plan, folders, launch_dir)
        if evaluation is not None:
            warnings.extend(evaluation.notes)
        prepared = Prepared(plan, catalog, cache, previews, None, max_bytes, folders, tuple(warnings), evaluation)
        if output_dir is not None:
            prepared = replace(prepared, targets=prepared.check_targets(output_dir))
    except BaseException:
        catalog.close()
        raise
    return prepared


def nonfinite_warnings(results: Mapping[str, NodeResult]) -> list[str]:
    """One line per node whose inputs or output hold NaN or inf (computed now, or recorded with the entry)."""
    lines = []
    for name, result in results.items():
        found = result.nonfinite
        for source, counts in found.get("inputs", {}).items():
            lines.append(f"node '{name}': its input '{source}' holds {describe(counts)}")
        if found.get("output"):
            lines.append(f"node '{name}': its output holds {describe(found['output'])}")
    return lines


class JobWarnings(logging.Handler):
    """Every warning this thread logs on merger's logger while a job runs (the plan's, the family
    check's, non-finite values, casts, the sanity check's, the cache's, previews'), in order and once
    each: the report's top-level `warnings`. Another thread's run in the same process is not mixed in."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._thread = threading.get_ident()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread:
            line = record.getMessage()
            if line not in self.lines:
                self.lines.append(line)

    def __enter__(self) -> JobWarnings:
        log.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self)


def _plain(value: float) -> float | None:
    """A value as JSON holds it (a failed metric's NaN is null)."""
    return None if value != value else value


def run(prepared: Prepared, context: RunContext, sweep_job: SweepJob | None = None) -> dict[str, Any]:
    """Materialise the plan, check merged image models (merger.report.sanity), place the outputs, write
    the report; returns the report. A job of a sweep claims its output files first
    (merger.engine.output_targets.claim_sweep_targets). Under `sanity: error` a failed check raises
    before any output is placed (the node's cache entry stays: it is what the recipe asks for)."""
    with JobWarnings() as said:
        return _run(prepared, context, sweep_job, said)


def _run(prepared: Prepared, context: RunContext, sweep_job: SweepJob | None, said: JobWarnings) -> dict[str, Any]:
    start = time.perf_counter()
    plan = prepared.plan
    checked = prepared.check_targets(context.output_dir)
    if sweep_job is not None:
        claim_sweep_targets(plan.recipe, checked, sweep_job)
    targets = {t.name: t for t in checked}
    for warning in prepared.warnings:
        log.warning(warning)
    prepared.cache.remove_stale_tmp()
    prepared.cache.memo.write_detections()  # what the plan's image-model checks found, for the next run
    executor = Executor(
        plan, prepared.cache, device=plan.recipe.settings.device, progress=plan.recipe.settings.progress
    )
    try:
        results = executor.run()
    finally:
        prepared.catalog.close()
    for warning in nonfinite_warnings(results):
        log.warning(warning)
    computed_on = executor.device.split(" ")[0] if executor.device else None  # "cuda:0 (torch)"
    sanity = check_nodes(plan, results, device=computed_on)  # under sanity: error, before any output is placed
    warnings: list[str] = []  # the outputs', said once they are placed
    outputs: dict[str, OutputResult] = {}
    card = CardContext(context.recipe_name, context.recipe_file, context.overrides)
    for name, output in plan.recipe.outputs.items():
        node = results[output.node]
        nonfinite = plan.nodes[output.node].nonfinite
        if name in prepared.folders:
            facts = prepared.folders[name]
            outputs[name] = place_folder(
                output, node, plan, prepared.cache, targets[name], facts, card, nonfinite=nonfinite
            )
            if outputs[name].left_out:
                left = describe_left_out(outputs[name].left_out)
                warnings.append(f"output '{name}': left out of the folder, from '{facts.config_from}': {left}")
        else:
            outputs[name] = place_output(output, node, prepared.cache, targets[name], nonfinite=nonfinite)
        if outputs[name].overflow:
            warnings.append(f"output '{name}': the cast to {output.dtype} made {describe(outputs[name].overflow)}")
    for warning in warnings:
        log.warning(warning)
    device = computed_on or (lambda: run_device(plan))
    previews = render(outputs, prepared.previews, context.output_dir, device=device)
    measured = (
        measure(prepared.evaluation, outputs, prepared.cache.metrics, device=device) if prepared.evaluation else None
    )
    report = build_report(
        plan,
        results,
        outputs,
        context,
        device=executor.device,
        seconds=time.perf_counter() - start,
        sanity=sanity,
        warnings=said.lines,
    )
    if previews.rows:
        report["previews"] = previews.rows
    if previews.notes:
        report["preview_notes"] = previews.notes
    if measured is not None and prepared.evaluation is not None:
        report["metrics"] = measured.metrics
        if measured.objective is not None:
            report["objective"] = [
                {"metric": o.metric, "output": o.output, "direction": o.direction, "value": _plain(value)}
                for o, value in zip(prepared.evaluation.objectives, measured.objective, strict=True)
            ]
    write_report(context.output_dir, report)
    write_html_report(context.output_dir, one_job_summary(report), title=f"merger run {context.output_dir.name}")
    log.info(summary(report))
    if prepared.max_cache_bytes is not None:
        from merger.cache.collect import collect

        used = {r.key for r in results.values()} | {k for o in outputs.values() for k in (o.entry_key, *o.more_keys)}
        freed = collect(prepared.cache, max_size=prepared.max_cache_bytes, keep=used)
        log.info(
            f"merger: cache_max_size {human_size(prepared.max_cache_bytes)}: removed {len(freed.removed)} files"
            f" ({human_size(freed.freed)}); the cache now holds {human_size(freed.bytes_after)}"
        )
    return report
