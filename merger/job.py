"""One job, start to end: recipe data -> Recipe -> Graph -> Plan -> Executor ->
outputs and report. The CLI's pre-flight runs `prepare` alone (validation
before any tensor is read); a job runs both steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.cache import Cache, cache_location
from merger.catalog import SourceCatalog, SpecsSeen
from merger.errors import MergerError
from merger.executor import Executor
from merger.graph import build_graph
from merger.ops.registry import OpRegistry
from merger.placement import OutputResult, place_output
from merger.plan import Plan, build_plan
from merger.preview import PreviewImage, preview_images, render
from merger.recipe import build_recipe
from merger.report import RunContext, build_report, summary, write_report

log = logging.getLogger("merger")


@dataclass(frozen=True)
class Prepared:
    plan: Plan
    catalog: SourceCatalog
    cache: Cache
    previews: list[PreviewImage]


def prepare(
    data: Mapping[str, Any], registry: OpRegistry, *, file: str, launch_dir: Path, seen: SpecsSeen | None = None
) -> Prepared:
    """Validate everything that can be checked from specs alone; reads no tensor data.

    `seen` shares the specs of files already opened between the jobs of one pre-flight.
    """
    recipe = build_recipe(data, registry, file=file)
    graph = build_graph(recipe)
    if recipe.settings.device.startswith("cuda"):
        from merger.arrays import check_cuda

        try:
            check_cuda(recipe.settings.device)
        except MergerError as e:
            raise e.located(file) from None
    cache = Cache(cache_location(recipe.settings.cache_dir, launch_dir))
    previews = preview_images(recipe.settings.preview, launch_dir, where=recipe.where("preview"))
    catalog = SourceCatalog(recipe, launch_dir, cache.memo, seen)
    try:
        plan = build_plan(recipe, graph, catalog, registry)
    except BaseException:
        catalog.close()
        raise
    return Prepared(plan, catalog, cache, previews)


def run(prepared: Prepared, context: RunContext) -> dict[str, Any]:
    """Materialise the plan, place the outputs, write the report; returns the report."""
    start = time.perf_counter()
    plan = prepared.plan
    for warning in plan.warnings:
        log.warning(warning)
    prepared.cache.remove_stale_tmp()
    executor = Executor(
        plan, prepared.cache, device=plan.recipe.settings.device, progress=plan.recipe.settings.progress
    )
    try:
        results = executor.run()
    finally:
        prepared.catalog.close()
    outputs: dict[str, OutputResult] = {}
    for name, output in plan.recipe.outputs.items():
        outputs[name] = place_output(output, results[output.node], prepared.cache, context.output_dir)
    previews = render({name: out.path for name, out in outputs.items()}, prepared.previews, context.output_dir)
    report = build_report(plan, results, outputs, context, device=executor.device, seconds=time.perf_counter() - start)
    if previews:
        report["previews"] = previews
    write_report(context.output_dir, report)
    log.info(summary(report))
    return report
