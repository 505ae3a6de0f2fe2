"""The Ray engine (neurolens.engines.ray) against the single-process scan, on img2dataset shards made
here (bad members and failed downloads included), on a local Ray that this module starts on loopback with
2 CPUs and shuts down.

Every Ray run is bounded: a handful of shards of a few dozen 64 px images through nl-tiny-RN; subprocess
drivers have a timeout."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")  # in the test extra; the single-process scan needs no Ray (test_scan.py)

from neurolens.engines.ray.session import RayOptions, loopback_only  # noqa: E402

from neurolens.pipelines.scan_find import find_scan  # noqa: E402
from neurolens.pipelines.scan import run_ray_scan, run_scan  # noqa: E402
from neurolens.storage.cache import Cache  # noqa: E402
from scan_data import write_img2dataset  # noqa: E402

pytestmark = pytest.mark.integration   # starts a local Ray cluster and its workers

LAYER = "image_block_3_0"   # nl-tiny-RN: 256 units on a 4x4 grid at 64 px
TOP_K = 4
HERE = Path(__file__).resolve().parent
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray (2 CPUs, no dashboard) whose servers listen on loopback only; stopped after the module."""
    if ray.is_initialized():
        ray.shutdown()
    loopback_only(ray)   # what run_ray_scan does before it starts a local Ray
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        address = context.address_info["gcs_address"]
        assert address.startswith("127.0.0.1:"), address
        yield address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 img2dataset shards (23 rows): 3 failed downloads, 9 bad members listed as success."""
    folder = tmp_path_factory.mktemp("laion")
    made = write_img2dataset(folder, [9, 6, 8], bad_every=2)
    return folder, made


@pytest.fixture(scope="module")
def reference(tiny_clip, shards, tmp_path_factory):
    folder, _ = shards
    return run_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, batch_size=5, workers=0,
                    cache=Cache(tmp_path_factory.mktemp("reference")))


def assert_same_scan(result, reference):
    """Top-k indices and cells exactly (same forward batch size: the same values), the rest to rounding."""
    for name in ("top_indices", "top_cells"):
        np.testing.assert_array_equal(getattr(result, name), getattr(reference, name), err_msg=name)
    for name in ("top_values", "mean", "var", "mean_map"):
        np.testing.assert_allclose(getattr(result, name), getattr(reference, name), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    assert (result.count, result.skipped_paths, result.skipped_reasons, result.keys, result.captions) == \
        (reference.count, reference.skipped_paths, reference.skipped_reasons, reference.keys, reference.captions)


def ray_processes():
    import psutil
    return [p for p in psutil.Process().children(recursive=True)]


def listening_addresses(processes):
    import psutil
    pids = {p.pid for p in processes}
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


@pytest.mark.parametrize("actors, batches_per_call", [(1, 8), (2, 1)])
def test_ray_scan_equals_single_process(tiny_clip, ray_cluster, shards, reference, tmp_path, actors,
                                        batches_per_call):
    folder, made = shards
    reports = []
    cache = Cache(tmp_path)
    result = run_ray_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, cache=cache, keep_per_image=True,
                          ray=RayOptions(actors=actors, batch_size=5, batches_per_call=batches_per_call,
                                         cpus_per_actor=0.5), report=reports.append)
    assert result.count == 23 - len(made["failed"]) - len(made["bad"]) and result.skipped == 12
    assert any("img2dataset status failed_to_download" in r for r in result.skipped_reasons)
    assert_same_scan(result, reference)
    # per-image maxima: float16, one chunk per shard, read like any scan's
    attrs = cache.read(result.path).attrs
    assert attrs["engine"] == "ray" and attrs["per_image"] and len(attrs["chunks"]) == 3
    assert attrs["forwarded"] == result.count
    per_image = result.per_image_max()
    np.testing.assert_array_equal(np.isnan(per_image).all(axis=1), ~result.valid)
    np.testing.assert_allclose(per_image, reference.per_image_max(), rtol=2e-3, atol=1e-3)
    # the record is the usual scan record: the single-process reader finds it for the same dataset
    found = find_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, cache=cache)
    assert found is not None and found.path == result.path
    final = reports[-1]
    assert (final.images_done, final.images_total, final.shards_done, final.shards_total, final.skipped) == \
        (23, 23, 3, 3, 12)
    assert final.images_per_s > 0 and "shards 3/3" in final.line()
    # the shard records are gone once the scan record is written; a second call reads the cache
    assert not list((tmp_path / "scan-shard").rglob("*.h5"))
    again = run_ray_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, cache=cache, keep_per_image=True,
                         ray=RayOptions(actors=actors))
    assert again.cached and again.path == result.path


def test_ray_scan_with_the_torchvision_decoder_equals_the_in_process_one(tiny_clip, ray_cluster, shards, reference,
                                                                        tmp_path):
    """--decode torchvision on Ray: decode tasks ship the JPEGs' bytes, the actor decodes them in batches; the
    same result as the in-process scan with that decoder, in its own record (the decoder is in the key)."""
    folder, _ = shards
    local = run_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, batch_size=5, workers=0, cache=Cache(tmp_path / "a"),
                     decoder="torchvision")
    cache = Cache(tmp_path / "b")
    result = run_ray_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, cache=cache, decoder="torchvision",
                          ray=RayOptions(actors=1, batch_size=5, cpus_per_actor=0.5))
    assert_same_scan(result, local)
    assert (result.decoder, cache.read(result.path).attrs["decoder"]) == ("torchvision", "torchvision")
    assert result.path.name != reference.path.name and result.skipped_reasons == reference.skipped_reasons


def test_killed_actor_is_restarted_and_nothing_is_counted_twice(tiny_clip, ray_cluster, tmp_path):
    folder = tmp_path / "data"
    write_img2dataset(folder, [8, 8, 8, 8], start_seed=500, bad_every=3)
    reference = run_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, batch_size=2, workers=0,
                         cache=Cache(tmp_path / "reference"))
    killed, addresses = [], set()

    def kill_an_actor(state):
        if killed or state.forwarded == 0:
            return
        actors = [p for p in ray_processes() if "ModelActor" in " ".join(p.cmdline())]
        addresses.update(listening_addresses(ray_processes()))
        if actors and state.images_done < state.images_total:
            os.kill(actors[0].pid, signal.SIGKILL)
            killed.append((actors[0].pid, state.images_done))

    cache = Cache(tmp_path / "ray")
    result = run_ray_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, cache=cache,
                          ray=RayOptions(actors=1, batch_size=2, batches_per_call=1, cpus_per_actor=0.5),
                          report=kill_an_actor)
    assert killed, "no actor was killed mid-run"
    assert_same_scan(result, reference)
    assert cache.read(result.path).attrs["forwarded"] >= result.count
    # while it ran, every Ray process listened on loopback only
    assert addresses and {ip for ip, _ in addresses} <= LOOPBACK, addresses


def test_killed_driver_resumes_without_recomputing_finished_shards(tiny_clip, ray_cluster, tmp_path):
    folder = tmp_path / "data"
    write_img2dataset(folder, [6] * 6, start_seed=900, bad_every=4)
    reference = run_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, batch_size=2, workers=0,
                         cache=Cache(tmp_path / "reference"))
    cache_dir = tmp_path / "ray"
    records = cache_dir / "scan-shard"
    command = [sys.executable, str(HERE / "ray_driver.py"), "--address", ray_cluster, "--dataset", str(folder),
               "--cache", str(cache_dir), "--layer", LAYER, "--batch-size", "2", "--batches-per-call", "1",
               "--compact-every", "2", "--top-k", str(TOP_K)]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if records.is_dir() and list(records.rglob("*-c*.h5")):   # two shards done and grouped
                driver.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL, "the driver finished before it could be killed"
    assert not list((cache_dir / "scan").rglob("*.h5"))
    cache = Cache(cache_dir)
    done_offsets, stamps = set(), {}
    for path in records.rglob("*.h5"):
        attrs = cache.read(path).attrs
        done_offsets.update(attrs["offsets"] if "offsets" in attrs else [attrs["offset"]])
        stamps[path] = path.stat().st_mtime_ns
    assert len(done_offsets) >= 2

    result = run_ray_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, cache=cache,
                          ray=RayOptions(actors=1, batch_size=2, compact_every=2, cpus_per_actor=0.5))
    assert_same_scan(result, reference)
    assert done_offsets <= set(result.resumed_from)
    readable_in_done = sum(int(reference.valid[offset:offset + 6].sum()) for offset in result.resumed_from)
    # the forwards of this run: exactly the readable images of the shards that were not finished
    assert cache.read(result.path).attrs["forwarded"] == reference.count - readable_in_done
    assert all(not path.exists() or path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())
    assert not list(records.rglob("*.h5"))   # shard and group records go once the scan record is written


def _driver(address: str, dataset: Path, cache: Path) -> dict:
    command = [sys.executable, str(HERE / "ray_driver.py"), "--address", address, "--dataset", str(dataset),
               "--cache", str(cache), "--layer", LAYER, "--batch-size", "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_memory_does_not_grow_with_the_number_of_images(ray_cluster, tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    write_img2dataset(small, [12, 12], start_seed=0, size=(64, 64))
    write_img2dataset(large, [60, 60, 60, 60], start_seed=0, size=(64, 64))
    few = _driver(ray_cluster, small, tmp_path / "c1")
    many = _driver(ray_cluster, large, tmp_path / "c2")
    assert many["count"] >= 10 * few["count"] - 10
    assert many["driver_peak_rss"] <= 1.15 * few["driver_peak_rss"], (few, many)
    assert many["actor_peak_rss"] <= 1.15 * few["actor_peak_rss"], (few, many)


def test_cli_scan_engine_ray_on_a_folder_cut_into_shards(tiny_clip, ray_cluster, tmp_path):
    """A folder (good, odd and bad files) cut into shards of 4 items: the in-process result, via the CLI."""
    from typer.testing import CliRunner
    from neurolens.cli import app
    from scan_data import make_bad_corpus
    folder = tmp_path / "corpus"
    make_bad_corpus(folder)
    reference = run_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, batch_size=5, workers=0,
                         cache=Cache(tmp_path / "reference"))
    base = ["scan", "--layer", LAYER, "--dataset", str(folder), "--model", "nl-tiny-RN", "--pretrained", "none",
            "--top-k", str(TOP_K), "--cache", str(tmp_path / "ray")]
    runner = CliRunner()
    done = runner.invoke(app, base + ["--engine", "ray", "--shard-size", "4", "--batch-size", "5",
                                      "--cpus-per-actor", "0.5", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == reference.summary()
    result = find_scan(tiny_clip, LAYER, str(folder), top_k=TOP_K, cache=Cache(tmp_path / "ray"))
    assert_same_scan(result, reference)
    assert Cache(tmp_path / "ray").read(result.path).attrs["shards"] == -(-len(reference.keys) // 4)
    wrong = runner.invoke(app, base + ["--engine", "ray", "--embeddings"])
    assert wrong.exit_code == 2 and "--embeddings cannot be used with --engine ray" in wrong.stderr
    wrong = runner.invoke(app, base + ["--engine", "ray", "--force", "--actors", "2", "--cpus-per-actor", "1"])
    assert wrong.exit_code == 2 and "leave no CPU of the cluster's 2 for decoding" in wrong.stderr
    wrong = runner.invoke(app, base + ["--keep-per-image"])
    assert wrong.exit_code == 2 and "--keep-per-image is for scan --engine ray" in wrong.stderr


SWEEP_LABELS = ["captions", "column:NSFW=NSFW,UNSURE"]   # named: kept whatever they agree (no sample decides)


@pytest.fixture(scope="module")
def sweep_data(tiny_clip, tmp_path_factory):
    """36 img2dataset rows (failed downloads, bad members; every 2nd image NSFW by caption and column) and
    the in-process sweep of them (exact AUC)."""
    from neurolens.pipelines.sweep import run_sweep
    folder = tmp_path_factory.mktemp("sweep-data")
    write_img2dataset(folder, [12, 12, 12], start_seed=2000, bad_every=5, nsfw_every=2)
    cache = tmp_path_factory.mktemp("sweep-reference")
    reference = run_sweep(tiny_clip, LAYER, str(folder), top_k=TOP_K, batch_size=5, workers=0, cache=cache,
                          labels=SWEEP_LABELS, out=cache / "flags.csv")
    assert reference.scores.method == "exact" and reference.scores.n_pos >= 10
    return folder, reference


@pytest.mark.parametrize("warmup", [1000, 8])
def test_fused_sweep_equals_the_in_process_sweep(tiny_clip, ray_cluster, sweep_data, tmp_path, warmup):
    """warmup >= the dataset: exact AUC; warmup 8: the rest binned, within the bound the counts give."""
    from neurolens.pipelines.sweep import run_ray_sweep
    folder, reference = sweep_data
    cache = Cache(tmp_path)
    result = run_ray_sweep(tiny_clip, LAYER, str(folder), top_k=TOP_K, cache=cache, labels=SWEEP_LABELS,
                           out=tmp_path / "flags.csv", warmup=warmup,
                           ray=RayOptions(actors=1, batch_size=5, cpus_per_actor=0.5))
    ours, theirs = result.scores, reference.scores
    np.testing.assert_array_equal(result.image_labels, reference.image_labels)
    for name in ("captions", "column:NSFW=NSFW,UNSURE"):
        np.testing.assert_array_equal(result.source_scores(name), reference.source_scores(name))
    assert (ours.n_pos, ours.n_neg, ours.sources) == (theirs.n_pos, theirs.n_neg, theirs.sources)
    np.testing.assert_allclose(ours.correlation, theirs.correlation, atol=1e-4)
    np.testing.assert_array_equal(ours.top_nsfw_share, theirs.top_nsfw_share)
    np.testing.assert_array_equal(result.scan.top_indices, reference.scan.top_indices)
    fused = cache.read(Path(result.attrs["fused_record"]))
    if warmup >= 36:
        assert ours.method == "exact"
        np.testing.assert_allclose(ours.auc, theirs.auc, rtol=1e-12)
        np.testing.assert_allclose(ours.q, theirs.q, rtol=1e-9)
    else:
        assert ours.method == "binned" and "decided on the first" in " ".join(result.lines())
        # pairs of one interval bin count half: the error is at most half the largest share of negatives
        # (or of positives) in one interval bin (neurolens.scoring.statistics), here read from the run's own counts
        pos, neg = fused.arrays["counts/pos"][:, 0::2], fused.arrays["counts/neg"][:, 0::2]
        bound = 0.5 * np.minimum(pos.max(axis=1) / ours.n_pos, neg.max(axis=1) / ours.n_neg)
        assert np.all(np.abs(ours.auc - theirs.auc) <= bound + 1e-12)
        assert np.abs(ours.auc - theirs.auc).max() > 0      # binned for real
    # no per-image values of any unit were stored; the sweep record is read back without a pass
    assert cache.read(result.scan.path).attrs["chunks"] == []
    assert not list((tmp_path / "scan-chunk").rglob("*.h5")) and not list((tmp_path / "scan-shard").rglob("*.h5"))
    again = run_ray_sweep(tiny_clip, LAYER, str(folder), top_k=TOP_K, cache=cache, labels=SWEEP_LABELS,
                          out=tmp_path / "flags.csv", warmup=warmup, ray=RayOptions(actors=1))
    assert again.cached and again.path == result.path
    assert (tmp_path / "flags.csv").read_text().startswith("# neurolens sweep")


def test_cli_sweep_engine_ray(ray_cluster, sweep_data, tmp_path):
    from typer.testing import CliRunner
    from neurolens.cli import app
    folder, reference = sweep_data
    base = ["sweep", "--layer", LAYER, "--dataset", str(folder), "--model", "nl-tiny-RN", "--pretrained", "none",
            "--top-k", str(TOP_K), "--cache", str(tmp_path), "--out", str(tmp_path / "flags.csv")]
    for label in SWEEP_LABELS:
        base += ["--labels", label]
    runner = CliRunner()
    done = runner.invoke(app, base + ["--engine", "ray", "--batch-size", "5", "--cpus-per-actor", "0.5", "--json"])
    assert done.exit_code == 0, done.output
    rows = json.loads(done.stdout)
    assert [row["unit"] for row in rows] == [row["unit"] for row in reference.ranking()]
    wrong = runner.invoke(app, base + ["--engine", "ray", "--keep-per-image"])
    assert wrong.exit_code == 2 and "a sweep on Ray stores no per-image values" in wrong.stderr


def test_concept_audit_on_ray_scores_the_ray_scans_per_image_values(tiny_clip, ray_cluster, sweep_data, tmp_path):
    """The Ray scan keeps per-image maxima (float16), then the in-process scorer runs over its chunks: the same
    labels, the same top images, AUCs within float16 rounding; a detector concept needs --engine process."""
    from dataclasses import replace
    from neurolens.labels.concepts import concept_set_of
    from neurolens.pipelines.concepts import run_concepts, run_ray_concepts
    from neurolens.pipelines.settings import ConceptSettings
    from neurolens.scoring.flags import FlagRule
    folder, _ = sweep_data
    concepts = concept_set_of([{"name": "nude", "terms": ["nude"]},
                               {"name": "tagged", "column": "NSFW", "values": ["NSFW", "UNSURE"]},
                               {"name": "detected", "detector": "nudenet"}], name="ray")
    settings = ConceptSettings(concepts=concepts, top_k=TOP_K, rule=FlagRule(max_q=1.0, min_auc=0.6))
    here = run_concepts(tiny_clip, LAYER, str(folder), replace(settings, detector=False),   # NudeNet: not here
                        cache=Cache(tmp_path / "here"), batch_size=5, workers=0)
    there = run_ray_concepts(tiny_clip, LAYER, str(folder), settings, cache=Cache(tmp_path / "ray"),
                             ray=RayOptions(actors=1, batch_size=5, cpus_per_actor=0.5))
    assert Cache(tmp_path / "ray").read(there.scan.path).attrs["per_image"] is True
    for name in ("nude", "tagged"):
        ours, theirs = there.concept(name), here.concept(name)
        np.testing.assert_array_equal(ours.labels.labels, theirs.labels.labels)
        assert (ours.n_pos, ours.n_neg, ours.used) == (theirs.n_pos, theirs.n_neg, theirs.used) and ours.n_pos >= 10
        np.testing.assert_array_equal(ours.top_share, theirs.top_share)
        assert np.abs(ours.auc - theirs.auc).max() <= 0.02
    assert there.concept("detected").labels is None and "--engine process" in there.concept("detected").note
    again = run_ray_concepts(tiny_clip, LAYER, str(folder), settings, cache=Cache(tmp_path / "ray"),
                             ray=RayOptions(actors=1))
    assert again.cached and again.rows() == there.rows()


def test_unreachable_ray_address_is_one_line():
    """(In a fresh process: this one is already connected.)"""
    script = """
from neurolens.engines.ray.session import RayOptions, ray_session
from neurolens.errors import NeurolensError
try:
    with ray_session(RayOptions(address="127.0.0.1:1")):
        pass
except NeurolensError as exc:
    print("error:", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "error: nothing answers at --ray-address 127.0.0.1:1" in done.stdout, done.stderr[-2000:]

