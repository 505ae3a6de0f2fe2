"""neurolens: a Microscope for CLIP models you run yourself.

The Python API: every operation of the CLI as a function returning numpy arrays and dataclasses.
Importing neurolens is light: each name below is imported from its module on first use (PEP 562), so
`import neurolens` and the CLI's start-up do not import torch or open_clip until something needs them.
Importing neurolens never imports typer or rich."""
from __future__ import annotations

import importlib
from typing import Any, Dict, Tuple

__version__ = "0.1.0"

# public name -> (module, attribute in it; "" for the module itself)
_API: Dict[str, Tuple[str, str]] = {
    "NeurolensError": ("neurolens.errors", "NeurolensError"),
    "LoadedClip": ("neurolens.models.build", "LoadedClip"),
    "check_unit": ("neurolens.models.layer_table", "check_unit"),
    "load_clip": ("neurolens.models.build", "load_clip"),
    "registry_for": ("neurolens.models.layers", "registry_for"),
    "resolve_layer": ("neurolens.models.layer_table", "resolve_layer"),
    "open": ("neurolens.pipelines.handle", "open_handle"),
    "Handle": ("neurolens.pipelines.handle", "Handle"),
    "load_model": ("neurolens.pipelines.model", "load_model"),
    "LazyClip": ("neurolens.pipelines.model", "LazyClip"),
    "UnitDashboard": ("neurolens.display.dashboard", "UnitDashboard"),
    "Cache": ("neurolens.storage.cache", "Cache"),
    "AuditResult": ("neurolens.audit.captions", "AuditResult"),
    "TermAudit": ("neurolens.audit.captions", "TermAudit"),
    "audit_captions": ("neurolens.audit.captions", "audit_captions"),
    "PairScore": ("neurolens.audit.similarity", "PairScore"),
    "image_text_similarity": ("neurolens.audit.similarity", "image_text_similarity"),
    "similarity_matrix": ("neurolens.audit.similarity", "similarity_matrix"),
    "run_visualize": ("neurolens.pipelines.visualize", "run_visualize"),
    "render": ("neurolens.optvis.loop", "render"),
    "LayerSpec": ("neurolens.types", "LayerSpec"),
    "RenderResult": ("neurolens.types", "RenderResult"),
    "RenderSettings": ("neurolens.types", "RenderSettings"),
    "objectives": ("neurolens.optvis.objectives", ""),
    "TextRanking": ("neurolens.pipelines.text", "TextRanking"),
    "run_text": ("neurolens.pipelines.text", "run_text"),
    "encode_texts": ("neurolens.text.encode", "encode_texts"),
    "unit_directions": ("neurolens.text.directions", "unit_directions"),
    "Vocabulary": ("neurolens.text.vocab", "Vocabulary"),
    "load_vocab": ("neurolens.text.vocab", "load_vocab"),
    "ImageDataset": ("neurolens.datasets.types", "ImageDataset"),
    "open_dataset": ("neurolens.datasets.open", "open_dataset"),
    "run_samples": ("neurolens.pipelines.samples", "run_samples"),
    "run_scan": ("neurolens.pipelines.scan", "run_scan"),
    "ScanResult": ("neurolens.records.scan", "ScanResult"),
    "ScanStats": ("neurolens.activations.stats", "ScanStats"),
    "scan_shard": ("neurolens.engines.local", "scan_shard"),
    "DemoReport": ("neurolens.pipelines.demo", "DemoReport"),
    "DemoSettings": ("neurolens.pipelines.demo", "DemoSettings"),
    "run_demo": ("neurolens.pipelines.demo", "run_demo"),
    "ConceptsDemoReport": ("neurolens.pipelines.demo_concepts", "ConceptsDemoReport"),
    "run_concepts_demo": ("neurolens.pipelines.demo_concepts", "run_concepts_demo"),
    "ZeroShotReport": ("neurolens.toy.evaluate", "ZeroShotReport"),
    "zero_shot_accuracy": ("neurolens.toy.evaluate", "zero_shot_accuracy"),
    "ToySettings": ("neurolens.toy.generate", "ToySettings"),
    "generate_pairs": ("neurolens.toy.generate", "generate_pairs"),
    "write_dataset": ("neurolens.toy.generate", "write_dataset"),
    "TrainResult": ("neurolens.toy.train", "TrainResult"),
    "TrainSettings": ("neurolens.toy.train", "TrainSettings"),
    "train_toy": ("neurolens.toy.train", "train_toy"),
    "run_figure": ("neurolens.pipelines.figures", "run_figure"),
    "run_grid": ("neurolens.pipelines.figures", "run_grid"),
    "LabelSettings": ("neurolens.pipelines.settings", "LabelSettings"),
    "SweepSettings": ("neurolens.pipelines.settings", "SweepSettings"),
    "SweepResult": ("neurolens.records.sweep", "SweepResult"),
    "run_ray_sweep": ("neurolens.pipelines.sweep", "run_ray_sweep"),
    "run_sweep": ("neurolens.pipelines.sweep", "run_sweep"),
    "ConceptSettings": ("neurolens.pipelines.settings", "ConceptSettings"),
    "ConceptsResult": ("neurolens.records.concepts", "ConceptsResult"),
    "read_concept_set": ("neurolens.labels.concepts", "read_concept_set"),
    "run_concepts": ("neurolens.pipelines.concepts", "run_concepts"),
    "run_ray_concepts": ("neurolens.pipelines.concepts", "run_ray_concepts"),
    "CompareModel": ("neurolens.pipelines.compare", "CompareModel"),
    "CompareResult": ("neurolens.pipelines.compare", "CompareResult"),
    "CompareSettings": ("neurolens.pipelines.compare", "CompareSettings"),
    "run_compare": ("neurolens.pipelines.compare", "run_compare"),
    "run_dose_demo": ("neurolens.pipelines.dose", "run_dose_demo"),
    "IMAGE_NSFW_THRESHOLD": ("neurolens.labels.prompts", "IMAGE_NSFW_THRESHOLD"),
    "nsfw_scores_for_embeddings": ("neurolens.labels.zero_shot", "nsfw_scores_for_embeddings"),
    "nsfw_scores_for_images": ("neurolens.labels.zero_shot", "nsfw_scores_for_images"),
    "text_nsfw_scores": ("neurolens.labels.zero_shot", "text_nsfw_scores"),
    "caption_nsfw_matches": ("neurolens.labels.lexicon", "caption_nsfw_matches"),
    "FlagRule": ("neurolens.scoring.units", "FlagRule"),
    "UnitScores": ("neurolens.scoring.units", "UnitScores"),
    "SaeTrainResult": ("neurolens.pipelines.sae", "SaeTrainResult"),
    "run_sae_train": ("neurolens.pipelines.sae", "run_sae_train"),
    "NeuronBasis": ("neurolens.sae.neurons", "NeuronBasis"),
    "SaeBasis": ("neurolens.sae.basis", "SaeBasis"),
    "SaeConfig": ("neurolens.sae.model", "SaeConfig"),
    "SaeTrainSettings": ("neurolens.sae.train", "SaeTrainSettings"),
    "SparseAutoencoder": ("neurolens.sae.model", "SparseAutoencoder"),
    "list_saes": ("neurolens.sae.registry", "list_saes"),
    "available_bases": ("neurolens.sae.basis", "available_bases"),
    "load_basis": ("neurolens.sae.basis", "load_basis"),
    "load_sae": ("neurolens.sae.io", "load_sae"),
    "save_sae": ("neurolens.sae.io", "save_sae"),
    "run_top_maps": ("neurolens.pipelines.topmaps", "run_top_maps"),
    "TopMaps": ("neurolens.records.maps", "TopMaps"),
    "SiteResult": ("neurolens.serve.site", "SiteResult"),
    "write_site": ("neurolens.serve.site", "write_site"),
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _API[name]
    except KeyError:
        raise AttributeError(f"module 'neurolens' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = getattr(module, attribute) if attribute else module
    globals()[name] = value          # the next access is a plain attribute
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_API))
