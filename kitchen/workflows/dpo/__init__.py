"""Preference training (DPO): ``dpo/{base_model, dataset, comparisons, reference_logprobs, checkpoints,
trained_weights, eval_report, registered_model}``.

How it fits the seam: the dataset is normalised by this package's row format (``format.PREFERENCE``:
hh-rlhf transcripts, UltraFeedback-binarized, prompt/chosen/rejected; UltraFeedback's ``train_prefs`` /
``test_prefs`` split names come from the format). Its two own assets live in ``kitchen_assets.dpo``:
``comparisons`` renders each pair through the chat template into a chosen and a rejected datum
(``comparisons.py``), and ``reference_logprobs`` scores them once with the starting model's sampling
client (``reference.py``), so the frozen reference is an asset with its own lineage and a rerun with a new
beta reuses it. The standard training step drives ``plan.DPOPlan`` through the one loop: each step is a
``forward_backward_custom`` with ``loss.dpo_loss`` (tinker-cookbook's ``compute_dpo_loss``; TRL's ipo and
hinge), so no engine knows DPO. ``evaluate.evaluate_dpo`` scores held-out pairs for the starting and the
trained model (preference accuracy for the gate, plus generative metrics where rows have answers).
Beta, the loss variant and the reference model are in the plan's fingerprint, hence in the run's
hyperparameters and the registered version's lineage.
"""

from __future__ import annotations

from kitchen.data.sources import LoadedDataset
from kitchen.manifests import BaseModelManifest
from kitchen.workflows.context import PlanContext
from kitchen.workflows.dpo import builtin as builtin  # registers kitchen/arithmetic-preferences
from kitchen.workflows.dpo.comparisons import read_pair_datums
from kitchen.workflows.dpo.config import SECTIONS, DPOConfig, PreferenceDatasetSection, smoke_run_config
from kitchen.workflows.dpo.evaluate import evaluate_dpo
from kitchen.workflows.dpo.format import PREFERENCE
from kitchen.workflows.dpo.manifests import ComparisonsManifest, ReferenceLogprobsManifest
from kitchen.workflows.dpo.plan import DPOPlan
from kitchen.workflows.dpo.reference import read_reference_logprobs
from kitchen.workflows.registry import Workflow, register_workflow
from kitchen.workflows.supervised import lora_learning_rate

NAME = "dpo"
#: DPO's learning rate as a share of the supervised LoRA rule's for the model (``dpo_learning_rate``).
LR_SHARE = 0.1


def load_preference_dataset(config: PreferenceDatasetSection) -> LoadedDataset:
    """Any accepted preference schema, normalised to (prompt, chosen, rejected, answer) pairs."""
    return config.load(PREFERENCE)


def reference_name(base_model: BaseModelManifest) -> str:
    """The reference is the starting model: its registered version when it is one, else its name."""
    return base_model.registered_version or base_model.name


def check_reference(
    base_model: BaseModelManifest, comparisons: ComparisonsManifest, reference: ReferenceLogprobsManifest
) -> None:
    """The stored reference log-probabilities belong to these comparisons and this starting model."""
    if reference.comparisons_hash != comparisons.content_hash:
        raise ValueError(
            "dpo/reference_logprobs were computed on other comparisons; materialise it again with them"
        )
    if (reference.reference_base_hash, reference.reference_sampler_path) != (
        base_model.content_hash,
        base_model.sampler_path,
    ):
        raise ValueError(
            f"dpo/reference_logprobs come from {reference.reference_model!r}, not the starting model "
            f"{reference_name(base_model)!r}; materialise it again"
        )


def build_plan(ctx: PlanContext) -> DPOPlan:
    comparisons, reference = ctx.inputs["comparisons"], ctx.inputs["reference_logprobs"]
    assert isinstance(comparisons, ComparisonsManifest) and isinstance(reference, ReferenceLogprobsManifest)
    check_reference(ctx.base_model, comparisons, reference)
    config = ctx.config
    return DPOPlan.build(
        read_pair_datums(comparisons.train_path),
        read_reference_logprobs(reference.train_path),
        beta=config.dpo_beta,
        loss_type=config.dpo_loss,
        batch_size=config.batch_size,
        epochs=config.epochs,
        seed=config.seed,
        max_steps=config.max_steps,
        identity={
            "comparisons_hash": comparisons.content_hash,
            "reference_logprobs_hash": reference.content_hash,
            "reference_model": reference.reference_model,
        },
    )


def dpo_learning_rate(base_model: BaseModelManifest) -> float:
    """``LR_SHARE`` times tinker-cookbook's LoRA rule for the model (README: the measured choice)."""
    return LR_SHARE * lora_learning_rate(base_model)


DPO = register_workflow(
    Workflow(
        name=NAME,
        summary="Preference training (DPO) on chosen/rejected pairs: the model learns what the data prefers.",
        config=DPOConfig,
        sections=SECTIONS,
        load_dataset=load_preference_dataset,
        build_plan=build_plan,
        evaluate=evaluate_dpo,
        default_learning_rate=dpo_learning_rate,
        train_inputs=("comparisons", "reference_logprobs"),
        eval_inputs=("comparisons", "reference_logprobs"),
        assets_module="kitchen_assets.dpo",
        smoke_config=smoke_run_config,
    )
)

__all__ = [
    "DPO",
    "NAME",
    "DPOConfig",
    "DPOPlan",
    "build_plan",
    "check_reference",
    "load_preference_dataset",
    "reference_name",
    "smoke_run_config",
]
