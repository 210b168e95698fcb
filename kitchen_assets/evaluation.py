"""The eval report: base and trained model scored on the same held-out data in the same run."""


import json
import time
from pathlib import Path

import dagster as dg

from kitchen.data import load_saved_dataset, prompt_and_answer, read_datums
from kitchen.eval.heldout import GenerationExample, HeldoutResult, evaluate_heldout
from kitchen.home import home_dir
from kitchen.manifests import BaseModelManifest, DatasetManifest, DatumsManifest, EvalManifest, WeightsManifest
from kitchen_assets.common import load_tokenizer
from kitchen_assets.config import EvalConfig
from kitchen_assets.metadata import markdown_table
from resources.training import TrainingBackend

PRIMARY_METRIC = "exact_match"
# Lower is better for these; the table's delta sign is still trained - base.
LOWER_IS_BETTER = frozenset({"nll", "perplexity"})


def comparison_rows(base: dict[str, float], trained: dict[str, float]) -> list[dict[str, object]]:
    return [
        {"metric": name, "base": base[name], "trained": trained[name], "delta": trained[name] - base[name]}
        for name in base
        if name in trained
    ]


def eval_report_asset(workflow: str) -> dg.AssetsDefinition:
    @dg.asset(
        name="eval_report",
        key_prefix=[workflow],
        group_name=workflow,
        kinds={"json"},
        ins={
            "base_model": dg.AssetIn(key=[workflow, "base_model"]),
            "dataset": dg.AssetIn(key=[workflow, "dataset"]),
            "datums": dg.AssetIn(key=[workflow, "datums"]),
            "trained_weights": dg.AssetIn(key=[workflow, "trained_weights"]),
        },
        description="Held-out NLL and exact match by greedy sampling, for the base and the trained model.",
    )
    def eval_report(
        context: dg.AssetExecutionContext,
        config: EvalConfig,
        training: TrainingBackend,
        base_model: BaseModelManifest,
        dataset: DatasetManifest,
        datums: DatumsManifest,
        trained_weights: WeightsManifest,
    ) -> EvalManifest:
        started = time.perf_counter()
        tokenizer = load_tokenizer(base_model)
        test_rows = load_saved_dataset(dataset.path)["test"]
        n = min(config.eval_examples, len(test_rows))
        examples = []
        for row in test_rows.select(range(n)):
            rendered = prompt_and_answer(row, tokenizer)
            examples.append(
                GenerationExample(
                    prompt_tokens=rendered.prompt_tokens,
                    reference=rendered.answer,
                    prompt_text=rendered.prompt_messages[-1]["content"] if rendered.prompt_messages else "",
                )
            )
        test_datums = read_datums(Path(datums.test_path))[:n]
        stop = [tokenizer.eos_token] if tokenizer.eos_token else []
        service = training.service_client()
        clients = {
            "base": service.create_sampling_client(base_model=base_model.backend_model),
            "trained": service.create_sampling_client(model_path=trained_weights.sampler_path),
        }
        results: dict[str, HeldoutResult] = {}
        for name, client in clients.items():
            results[name] = evaluate_heldout(
                client, test_datums, examples, max_tokens=config.eval_max_tokens, stop=stop
            )
            context.log.info(f"{name}: {results[name].metrics} ({results[name].seconds:.1f}s)")
        seconds = time.perf_counter() - started
        report = {
            "workflow": workflow,
            "run_id": context.run_id,
            "primary_metric": PRIMARY_METRIC,
            "num_examples": n,
            "base": results["base"].metrics,
            "trained": results["trained"].metrics,
            "generations": {k: r.generations for k, r in results.items()},
            "seconds": seconds,
        }
        report_path = home_dir("reports", workflow) / f"{context.run_id}.json"
        report_path.write_text(json.dumps(report, indent=2))
        rows = comparison_rows(results["base"].metrics, results["trained"].metrics)
        samples = [
            {"prompt": b["prompt"], "reference": b["reference"], "base": b["output"], "trained": t["output"]}
            for b, t in zip(results["base"].generations, results["trained"].generations, strict=False)
        ]
        context.add_output_metadata(
            {
                "comparison": dg.MetadataValue.md(markdown_table(rows)),
                "samples": dg.MetadataValue.md(markdown_table(samples)),
                f"base_{PRIMARY_METRIC}": results["base"].metrics.get(PRIMARY_METRIC, float("nan")),
                f"trained_{PRIMARY_METRIC}": results["trained"].metrics.get(PRIMARY_METRIC, float("nan")),
                "examples": n,
                "eval_seconds": seconds,
                "report": dg.MetadataValue.path(str(report_path)),
            }
        )
        return EvalManifest(
            report_path=str(report_path),
            primary_metric=PRIMARY_METRIC,
            base=results["base"].metrics,
            trained=results["trained"].metrics,
            num_examples=n,
            seconds=seconds,
        )

    return eval_report
