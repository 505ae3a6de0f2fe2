"""neurolens: a Microscope for CLIP models you run yourself.

The Python API: every operation of the CLI as a function returning numpy arrays and dataclasses.
Importing neurolens never imports typer or rich."""
from .errors import NeurolensError
from .models import LoadedClip, check_unit, load_clip, registry_for, resolve_layer
from .storage.cache import Cache

__version__ = "0.1.0"

__all__ = [
    "NeurolensError", "LoadedClip", "load_clip", "registry_for", "resolve_layer", "check_unit", "Cache",
]

# audits (the paper's cosine-threshold probe and caption string-match audit)
from .audit.captions import AuditResult, TermAudit, audit_captions  # noqa: E402
from .audit.similarity import PairScore, image_text_similarity, similarity_matrix  # noqa: E402

__all__ += ["audit_captions", "AuditResult", "TermAudit", "image_text_similarity", "similarity_matrix", "PairScore"]

# feature visualization
from .pipelines.visualize import run_visualize  # noqa: E402
from .render.loop import render  # noqa: E402
from .types import LayerSpec, RenderResult, RenderSettings  # noqa: E402
from .render import objectives  # noqa: E402

__all__ += ["run_visualize", "render", "RenderSettings", "RenderResult", "LayerSpec", "objectives"]

# text feature visualization
from .pipelines.text import TextRanking, run_text  # noqa: E402
from .text.encode import encode_texts  # noqa: E402
from .text.directions import unit_directions  # noqa: E402
from .text.vocab import Vocabulary, load_vocab  # noqa: E402

__all__ += ["run_text", "TextRanking", "encode_texts", "unit_directions", "load_vocab", "Vocabulary"]

# dataset scans and samples
from .datasets.types import ImageDataset  # noqa: E402
from .datasets.open import open_dataset  # noqa: E402
from .pipelines.samples import run_samples  # noqa: E402
from .pipelines.scan import run_scan  # noqa: E402
from .records.scan import ScanResult  # noqa: E402
from .activations.stats import ScanStats  # noqa: E402
from .engines.local import scan_shard  # noqa: E402

__all__ += ["open_dataset", "ImageDataset", "run_scan", "ScanResult", "run_samples", "scan_shard", "ScanStats"]

# the toy CLIP and the offline demo
from .pipelines.demo import DemoReport, DemoSettings, run_demo  # noqa: E402
from .toy.evaluate import ZeroShotReport, zero_shot_accuracy  # noqa: E402
from .toy.generate import ToySettings, generate_pairs, write_dataset  # noqa: E402
from .toy.train import TrainResult, TrainSettings, train_toy  # noqa: E402

__all__ += ["run_demo", "DemoSettings", "DemoReport", "train_toy", "TrainSettings", "TrainResult",
            "generate_pairs", "write_dataset", "ToySettings", "zero_shot_accuracy", "ZeroShotReport"]

# NSFW sweep, scores and blurred figures
from .pipelines.figures import run_figure, run_grid  # noqa: E402
from .pipelines.settings import LabelSettings, SweepSettings  # noqa: E402
from .records.sweep import SweepResult  # noqa: E402
from .pipelines.sweep import run_ray_sweep, run_sweep  # noqa: E402
from .labels.zero_shot import (IMAGE_NSFW_THRESHOLD, nsfw_scores_for_embeddings, nsfw_scores_for_images,  # noqa: E402
                               text_nsfw_scores)
from .labels.lexicon import caption_nsfw_matches  # noqa: E402
from .scoring.units import FlagRule, UnitScores  # noqa: E402

__all__ += ["run_sweep", "run_ray_sweep", "SweepSettings", "LabelSettings", "SweepResult", "run_figure", "run_grid",
            "nsfw_scores_for_images",
            "nsfw_scores_for_embeddings", "caption_nsfw_matches", "text_nsfw_scores", "IMAGE_NSFW_THRESHOLD",
            "FlagRule", "UnitScores"]

# sparse autoencoder features as units
from .pipelines.sae import SaeTrainResult, run_sae_train  # noqa: E402
from .sae import (NeuronBasis, SaeBasis, SaeConfig, SaeTrainSettings, SparseAutoencoder, list_saes,  # noqa: E402
                  available_bases, load_basis, load_sae, save_sae)

__all__ += ["run_sae_train", "SaeTrainResult", "SaeTrainSettings", "load_basis", "available_bases", "NeuronBasis",
            "SaeBasis", "SparseAutoencoder", "SaeConfig", "load_sae", "save_sae", "list_saes"]

# the web app's data: activation maps of the top images, and the static site (the server itself is
# neurolens.serve.server.serve, which needs the serve extra)
from .pipelines.topmaps import run_top_maps  # noqa: E402
from .records.maps import TopMaps  # noqa: E402
from .serve.site import SiteResult, write_site  # noqa: E402

__all__ += ["run_top_maps", "TopMaps", "write_site", "SiteResult"]
