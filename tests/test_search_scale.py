"""Search at scale (issue 19): chunked, memory-bounded index builds; serving from disk (memory-mapped index, Arrow
metadata by row id); the build split across processes under torchrun."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="faiss-cpu is in the test extras")
pytest.importorskip("pyarrow", reason="pyarrow is in the test extras")

from clipforge.retrieval.collection import (Metadata, StoredVectors, load_metadata, write_image_shard,  # noqa: E402
                                            write_info)
from clipforge.retrieval.index import (add_chunks, build_index, load_index, plan_ivfpq, save_index,  # noqa: E402
                                       train_ivfpq)
from conftest import free_port  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


def clustered(n: int, d: int, seed: int, clusters: int = 64) -> np.ndarray:
    """Unit vectors around ``clusters`` centres: the structure real CLIP embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    vectors = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_collection(folder: Path, vectors: np.ndarray, shard_rows, captions: np.ndarray | None = None) -> None:
    """Shards of the given sizes (a list) or of one size, with a path per row naming its id; ``captions``: the
    rows' caption vectors, as ``embed --captions`` stores them (zeros: no caption)."""
    sizes = shard_rows if isinstance(shard_rows, list) else \
        [min(shard_rows, len(vectors) - s) for s in range(0, len(vectors), shard_rows)]
    start = 0
    for shard, size in enumerate(sizes):
        ids = range(start, start + size)
        write_image_shard(folder, shard, vectors[start:start + size],
                          {"path": [f"img/{i}.jpg" for i in ids], "caption": [f"caption {i}" for i in ids],
                           "width": [i % 500 for i in ids], "height": [7] * size},
                          None if captions is None else captions[start:start + size])
        start += size
    if captions is not None:
        write_info(folder, {"captions": True})


def run_cli(*args, env=None, check=True, prefix=()):
    env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.run([*prefix, *(args[0] if isinstance(args[0], list) else [sys.executable, "-m",
                                                                                "clipforge.cli", *args])],
                          env=env, capture_output=True, text=True, check=check, timeout=600)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    vectors = clustered(6_000, 32, seed=0)
    write_collection(folder, vectors, [2_500, 1, 2_499, 1_000])  # uneven shards, one of a single row
    return folder, vectors


@pytest.fixture(scope="module")
def captioned_small(tmp_path_factory):
    """``small``'s layout embedded with --captions: each caption vector near its image's, 30% of rows without one."""
    folder = tmp_path_factory.mktemp("scale-captions")
    vectors = clustered(6_000, 32, seed=0)
    rng = np.random.default_rng(1)
    captions = vectors + 0.5 * rng.standard_normal(vectors.shape, dtype=np.float32)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    captions[rng.random(len(captions)) < 0.3] = 0
    captions[2_500] = 0  # the one-row shard has no caption at all
    write_collection(folder, vectors, [2_500, 1, 2_499, 1_000], captions)
    return folder, vectors, captions


def test_stored_vectors_read_by_id_and_in_chunks_across_shards(small):
    folder, vectors = small
    stored = StoredVectors(folder)
    assert stored.shape == (6_000, 32)
    ids = [5_999, 0, 2_500, 2_499, 2_501, 3_000, 2_500]  # shard ends, the one-row shard, repeats, any order
    expected = vectors[ids].astype(np.float16).astype(np.float32)
    assert np.allclose(stored.get(ids), expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)
    chunks = list(stored.chunks(1_234))
    assert [first for first, _ in chunks] == list(range(0, 6_000, 1_234))
    assert np.array_equal(np.concatenate([c for _, c in chunks]), vectors.astype(np.float16).astype(np.float32))
    with pytest.raises(IndexError, match="out of range"):
        stored.get([6_000])


def test_chunked_build_equals_one_shot_build_for_the_same_trained_quantizer(small):
    import faiss

    folder, vectors = small
    stored = StoredVectors(folder)
    plan = plan_ivfpq(len(stored), stored.dim, nlist=32)
    trained = train_ivfpq(stored, plan, seed=0)
    one_shot, chunked = faiss.clone_index(trained), faiss.clone_index(trained)
    one_shot.add(stored.slice(0, len(stored)))
    add_chunks(chunked, stored, 777)
    for index in (one_shot, chunked):
        faiss.extract_index_ivf(index).nprobe = 8
    queries = clustered(50, 32, seed=9)
    assert np.array_equal(one_shot.search(queries, 10)[1], chunked.search(queries, 10)[1])
    lists_a, lists_b = faiss.extract_index_ivf(one_shot).invlists, faiss.extract_index_ivf(chunked).invlists
    for lst in range(32):
        assert lists_a.list_size(lst) == lists_b.list_size(lst)
        size = lists_a.list_size(lst) * lists_a.code_size
        assert faiss.rev_swig_ptr(lists_a.get_codes(lst), size).tobytes() == \
            faiss.rev_swig_ptr(lists_b.get_codes(lst), size).tobytes()


def test_index_holds_codes_only_and_memory_mapped_serving_returns_the_in_ram_results(small, tmp_path):
    folder, vectors = small
    target = tmp_path / "c"
    shutil.copytree(folder, target)
    index, info = build_index(StoredVectors(target), kind="ivfpq", target_recall=0.95, nlist=32)
    assert info["rerank"] == "stored" and info["target_met"], info
    save_index(index, info, target)
    # codes (8 bytes of PQ + 8 of id a vector) and the quantizer, no float copy of the vectors (6,000 x 32 x 4 bytes)
    assert (target / "index.faiss").stat().st_size < 6_000 * 32 * 4 / 3
    rng = np.random.default_rng(5)  # fresh queries near the data, as the tuning ones are
    queries = vectors[rng.integers(0, len(vectors), 100)] + 0.1 * rng.standard_normal((100, 32), dtype=np.float32)
    in_ram, _ = load_index(target)
    mapped, _ = load_index(target, mmap=True)
    scores_a, ids_a = in_ram.search(queries, 10)
    scores_b, ids_b = mapped.search(queries, 10)
    assert np.array_equal(ids_a, ids_b) and np.array_equal(scores_a, scores_b)
    exact = np.argsort(-(vectors @ queries.T).T, axis=1)[:, :10]
    assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids_a, exact)]) >= 0.9


def test_metadata_by_row_id_at_shard_ends_and_middles_memory_mapped_or_not(small, tmp_path):
    from clipforge.retrieval.collection import write_metadata_arrow

    folder, _ = small
    target = tmp_path / "m"
    shutil.copytree(folder, target)
    rows = load_metadata(target)
    ids = [0, 1_250, 2_499, 2_500, 2_501, 3_700, 4_999, 5_000, 5_500, 5_999]
    parquet = Metadata(target)
    assert not parquet.memory_mapped and len(parquet) == 6_000
    assert write_metadata_arrow(target) == 4 and write_metadata_arrow(target) == 0  # up to date: not rewritten
    mapped = Metadata(target)
    assert mapped.memory_mapped
    for i in ids:
        assert parquet[i] == mapped[i] == rows[i] == {"path": f"img/{i}.jpg", "caption": f"caption {i}",
                                                      "width": i % 500, "height": 7}
    with pytest.raises(IndexError):
        mapped[6_000]


def peak_rss_of(args, env=None) -> tuple[int, subprocess.CompletedProcess]:
    """Run the CLI in a fresh interpreter and return its own peak RSS (VmHWM, bytes) with the result."""
    code = ("import sys, re; from clipforge import cli; rc = cli.main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
            "print('PEAK', int(hwm) * 1024); print('TORCH', 'torch' in sys.modules); sys.exit(rc)")
    done = run_cli([sys.executable, "-c", code, *args], env=env)
    peak = int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK")))
    return peak, done


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_a_collection_larger_than_the_memory_budget_builds_within_it(tmp_path):
    n, d = 640_000, 64  # 156 MiB as float32 (78 MiB on disk as float16), against a 150 MiB budget for everything
    folder = tmp_path / "big"
    for shard, start in enumerate(range(0, n, 200_000)):
        part = clustered(min(200_000, n - start), d, seed=shard, clusters=256)
        write_image_shard(folder, shard, part, {"path": [f"{start + i}.jpg" for i in range(len(part))],
                                                "caption": [""] * len(part), "width": [0] * len(part),
                                                "height": [0] * len(part)})
    budget = 150 * 2**20
    assert n * d * 4 > budget  # the collection as float32 is larger than the whole process may use
    peak, done = peak_rss_of(["index", "build", str(folder), "--kind", "ivfpq", "--nlist", "256",
                              "--max-memory", str(budget)])
    assert "plan:" in done.stderr and "budget" in done.stderr
    info = json.loads((folder / "index.json").read_text())
    assert info["count"] == n and info["target_met"] and info["plan"]["max_memory"] == budget
    assert peak <= budget, f"peak RSS {peak / 2**20:.0f} MB over the {budget / 2**20:.0f} MB budget"
    assert "TORCH False" in done.stdout  # the build never imports torch (~650 MB of RSS by itself)
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_cli("index", "build", str(folder), "--kind", "ivfpq", "--max-memory", "50MB")
    assert "--max-memory" in failed.value.stderr and "needs at least" in failed.value.stderr


def test_two_process_torchrun_build_equals_the_one_process_build(captioned_small, tmp_path):
    """Both indexes of a collection embedded with --captions: the images' and the captions'."""
    pytest.importorskip("torch.distributed.run")
    folder = captioned_small[0]
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(folder, one)
    shutil.copytree(folder, two)
    env = {"OMP_NUM_THREADS": "1"}  # k-means as torchrun's ranks run it: identical training in both builds
    run_cli("index", "build", str(one), "--kind", "ivfpq", "--nlist", "32", "--quiet", env=env)
    port = str(free_port())  # for the rendezvous
    done = run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    port, "-m", "clipforge.cli", "index", "build", str(two), "--kind", "ivfpq", "--nlist", "32"],
                   env=env)
    assert "[rank 1] added" in done.stderr and "merged 2 parts" in done.stderr
    assert sorted(p.name for p in two.glob("*index*")) == ["caption_index.faiss", "caption_index.json",
                                                           "caption_index.rows.npy", "index.faiss",
                                                           "index.json"]  # parts cleaned up
    queries = clustered(40, 32, seed=11)
    for stem, modality in (("index", "image"), ("caption_index", "text")):
        info_one, info_two = (json.loads((f / f"{stem}.json").read_text()) for f in (one, two))
        assert info_two.pop("built_by") == 2
        for info in (info_one, info_two):  # (each process's own estimate: torchrun's ranks have torch imported)
            del info["plan"]["estimated_peak_bytes"]
        assert info_one == info_two
        assert (one / f"{stem}.faiss").read_bytes() == (two / f"{stem}.faiss").read_bytes()
        assert np.array_equal(load_index(one, modality=modality)[0].search(queries, 10)[1],
                              load_index(two, modality=modality)[0].search(queries, 10)[1])


def test_the_plan_fits_a_budget_by_smaller_chunks_then_shorter_codes():
    from clipforge.retrieval.index import parse_size

    assert parse_size("2GB") == 2 * 2**30 and parse_size("512MB") == 512 * 2**20 and parse_size("1.5g") == 3 * 2**29
    assert parse_size(1000) == 1000 and parse_size(None) is None
    with pytest.raises(ValueError, match="2 gigs"):
        parse_size("2 gigs")
    roomy = plan_ivfpq(10_000_000, 128, in_use=0)
    assert (roomy["pq_m"], roomy["pq_bits"], roomy["chunk_rows"], roomy["nlist"]) == (32, 8, 131_072, 2048)
    tighter = plan_ivfpq(10_000_000, 128, max_memory=roomy["estimated_peak_bytes"] - 1, in_use=0)
    assert tighter["pq_m"] == 32 and tighter["chunk_rows"] < roomy["chunk_rows"]
    # codes alone (2 x (32 + 8) bytes a vector with list growth) exceed 700 MB: shorter codes
    shortest = plan_ivfpq(10_000_000, 128, max_memory=700 * 2**20, in_use=0)
    assert shortest["pq_m"] < 32 and shortest["estimated_peak_bytes"] <= 700 * 2**20
    with pytest.raises(MemoryError, match="needs at least"):
        plan_ivfpq(10_000_000, 128, max_memory=100 * 2**20, in_use=0)


def test_an_index_built_before_the_rerank_moved_out_still_loads(small, tmp_path):
    """Folders indexed by earlier versions (fast-scan IVF-PQ with an in-index float copy, index.json without
    "rerank", metadata without Arrow copies) keep working."""
    import faiss

    folder, vectors = small
    target = tmp_path / "old"
    shutil.copytree(folder, target)
    old = faiss.index_factory(32, "IVF16,PQ16x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
    old.train(vectors)
    old.add(vectors)
    faiss.write_index(old, str(target / "index.faiss"))
    (target / "index.json").write_text(json.dumps({"kind": "ivfpq", "count": 6000, "dim": 32, "nlist": 16,
                                                   "nprobe": 16, "k_factor": 8, "recall@10": 1.0}))
    index, _ = load_index(target, mmap=True)
    assert faiss.extract_index_ivf(index).nprobe == 16 and faiss.downcast_index(index).k_factor == 8
    assert index.search(vectors[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
    assert not Metadata(target).memory_mapped and Metadata(target)[5_999]["path"] == "img/5999.jpg"


def test_the_caption_index_holds_the_captioned_rows_and_answers_in_collection_row_ids(captioned_small, tmp_path):
    """IVF-PQ and HNSW caption indexes: built over the rows with a caption only (``RowSubset``), re-ranked from
    the stored caption vectors, each result named by its collection row; recall against exact search holds."""
    import clipforge
    from clipforge.retrieval.index import RowSubset
    from clipforge.retrieval.search import Searcher

    folder, _, captions = captioned_small
    has_caption = np.flatnonzero(captions.any(axis=1))
    stored = StoredVectors(folder, "text")
    subset = RowSubset(stored, has_caption)
    assert subset.shape == (len(has_caption), 32)
    across = has_caption[(has_caption > 2_490) & (has_caption < 2_510)]
    for rows in (has_caption, has_caption[[0, -1]], across):  # dense, sparse, across shards
        part = RowSubset(stored, rows)
        sliced, got = part.slice(0, len(rows)), part.get(np.arange(len(rows)))
        assert np.allclose(sliced / np.linalg.norm(sliced, axis=1, keepdims=True), got, atol=1e-6)
        assert np.allclose(got, stored.get(rows))
    with pytest.raises(FileNotFoundError, match="holds no caption embeddings"):
        StoredVectors(write_plain(tmp_path / "plain"), "text")

    unit = captions[has_caption].astype(np.float16).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    rng = np.random.default_rng(12)  # fresh queries near the data, as the tuning ones are
    queries = unit[rng.integers(0, len(unit), 50)] + 0.1 * rng.standard_normal((50, 32), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = has_caption[np.argsort(-(queries @ unit.T), axis=1, kind="stable")[:, :10]]
    model = clipforge.create_model("ViT-Tiny-64")
    for kind in ("ivfpq", "hnsw"):
        target = tmp_path / kind
        shutil.copytree(folder, target)
        run_cli("index", "build", str(target), "--kind", kind, "--nlist", "32", "--modality", "text", "--quiet")
        assert not (target / "index.faiss").exists()  # --modality text: the captions' index alone
        run_cli("index", "build", str(target), "--kind", "flat", "--modality", "image", "--quiet")
        searcher = Searcher(target, model, None, None)
        assert searcher.captions_indexed == len(has_caption)
        hits = searcher.search_vectors(queries, k=10, modality="text")
        ids = np.array([[h["id"] for h in row] for row in hits])
        assert np.isin(ids, has_caption).all()
        scores = np.array([[h["score"] for h in row] for row in hits])
        exact = np.einsum("qd,qkd->qk", queries, captions[ids].astype(np.float16).astype(np.float32)
                          / np.linalg.norm(captions[ids].astype(np.float16).astype(np.float32), axis=2,
                                           keepdims=True))
        assert np.allclose(scores, exact, atol=1e-3)  # those very rows' caption vectors (HNSW: as stored, fp16)
        assert all(h["caption"] == f"caption {h['id']}" for row in hits for h in row)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())])
        assert recall >= 0.9, (kind, recall)


def write_plain(folder: Path) -> Path:
    write_collection(folder, clustered(20, 32, seed=3), 10)
    return folder


def test_a_collection_whose_images_have_no_caption_gets_no_caption_index(tmp_path):
    folder = tmp_path / "c"
    vectors = clustered(40, 32, seed=4)
    write_collection(folder, vectors, 16, np.zeros_like(vectors))  # embedded with --captions, none had one
    done = run_cli("index", "build", str(folder))
    assert "no image of" in done.stderr and "has a caption: no caption index" in done.stderr
    assert (folder / "index.faiss").exists() and not (folder / "caption_index.faiss").exists()
    refused = run_cli("index", "build", str(folder), "--modality", "text", check=False)
    assert refused.returncode == 2 and "no image has a caption to index" in refused.stderr


def test_an_index_takes_the_images_embedded_since_it_was_built_unless_rows_changed(tmp_path, capsys):
    """After `embed` added images, `index build` adds their vectors to the IVF-PQ index (its trained quantizer kept)
    and to the caption index (their captioned rows after the indexed ones), tuned again to the target; with
    --rebuild, when earlier rows changed, or past twice the rows it was built over, it builds anew."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge import cli
    from clipforge.retrieval.index import exact_top_k, recall_at_k
    from clipforge.retrieval.search import Searcher

    vectors = clustered(6_000, 32, seed=3)
    rng = np.random.default_rng(4)
    captions = vectors + 0.5 * rng.standard_normal(vectors.shape, dtype=np.float32)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    captions[rng.random(len(captions)) < 0.3] = 0
    folder = tmp_path / "emb"
    write_collection(folder, vectors[:4_000], [2_500, 1_500], captions[:4_000])

    def build(*extra):
        capsys.readouterr()
        assert cli.main(["index", "build", str(folder), "--kind", "ivfpq", "--target-recall", "0.9", "--quiet",
                         "--tune-queries", "collection", *extra]) == 0
        return capsys.readouterr().out

    def centroids():
        index = load_index(folder)[0]  # held while its quantizer is read
        ivf = faiss.extract_index_ivf(index.index)
        return faiss.downcast_index(ivf.quantizer).reconstruct_n(0, ivf.nlist).copy()

    assert build().count("built ivfpq") == 2
    before = centroids()
    write_image_shard(folder, 2, vectors[4_000:], {"path": [f"img/{i}.jpg" for i in range(4_000, 6_000)],
                                                   "caption": [""] * 2_000, "width": [0] * 2_000,
                                                   "height": [0] * 2_000}, captions[4_000:])
    printed = build("--target-recall", "0.97")  # tuned again, to the target given now
    assert "added 2000 vectors to the ivfpq index of 4000 (now 6000" in printed
    assert "vectors to the ivfpq caption index of" in printed
    np.testing.assert_array_equal(centroids(), before)  # not trained again
    index, info = load_index(folder)
    queries = vectors[::30] + 0.1 * np.random.default_rng(9).standard_normal((200, 32), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)  # near the collection, old rows and new alike
    truth = exact_top_k(vectors, queries, 10)[1]
    assert index.ntotal == 6_000 and info["extended_from"] == 4_000 and info["collection_rows"] == 6_000
    assert info["target_recall"] == 0.97 and info["target_met"]
    assert recall_at_k(index.search(queries, 10)[1], truth) >= 0.85
    rows = np.load(folder / "caption_index.rows.npy")
    assert np.array_equal(rows, np.flatnonzero(captions.any(axis=1)))  # old rows, then the new captioned ones
    searcher = Searcher.__new__(Searcher)  # the caption index's answers, as serving maps them, without a model
    searcher.folder, searcher.rows = folder, Metadata(folder)
    searcher.indexes = {"text": (load_index(folder, modality="text", vectors=None)[0], None, rows)}
    found = searcher.search_vectors(queries[:50], k=10, modality="text")
    exact = rows[exact_top_k(captions[rows], queries[:50], 10)[1]]
    assert recall_at_k(np.array([[h["id"] for h in hits] for hits in found]), exact) >= 0.85

    assert build("--rebuild").count("built ivfpq") == 2  # asked to
    write_image_shard(folder, 3, vectors[:100], {"path": [f"again/{i}.jpg" for i in range(100)],
                                                 "caption": [""] * 100, "width": [0] * 100, "height": [0] * 100},
                      captions[:100])
    parquet = folder / "metadata" / "metadata_00000.parquet"  # earlier rows renamed: built anew
    table = pq.read_table(parquet)
    pq.write_table(table.set_column(0, "path", pa.array(["moved/" + p for p in table.column("path").to_pylist()])),
                   parquet)
    assert build().count("built ivfpq") == 2


def test_index_build_leaves_an_up_to_date_index_unless_asked_for_another(tmp_path, capsys):
    """Nothing embedded since and the same settings: `index build` leaves the index as it is (saying so); another
    kind, target recall or list count, or --rebuild, builds it anew."""
    from clipforge import cli

    folder = tmp_path / "emb"
    write_collection(folder, clustered(3_000, 32, seed=6), 1_500)

    def build(*extra):
        capsys.readouterr()
        assert cli.main(["index", "build", str(folder), "--quiet", "--kind", "ivfpq", "--target-recall", "0.9",
                         *extra]) == 0
        return capsys.readouterr().out

    assert "built ivfpq index" in build()
    written = (folder / "index.faiss").stat().st_mtime_ns
    assert "is up to date" in build() and (folder / "index.faiss").stat().st_mtime_ns == written
    assert "built ivfpq index" in build("--nlist", "16")
    assert "is up to date" in build("--nlist", "16")
    assert "built ivfpq index" in build("--target-recall", "0.8")
    assert "built ivfpq index" in build("--rebuild")
    queries = tmp_path / "queries.npy"  # tuned on a query file: up to date while the same queries are given
    np.save(queries, clustered(200, 32, seed=7))
    assert "built ivfpq index" in build("--tune-queries", str(queries))
    assert "is up to date" in build("--tune-queries", str(queries))
    np.save(queries, clustered(200, 32, seed=8))
    assert "built ivfpq index" in build("--tune-queries", str(queries))  # the same file, other queries
    assert "built ivfpq index" in build("--tune-queries", "collection")
    assert "is up to date" in build("--tune-queries", "collection")
    assert "built ivfpq index" in build()  # auto again
    capsys.readouterr()
    assert cli.main(["index", "build", str(folder), "--quiet", "--kind", "hnsw"]) == 0
    assert "built hnsw index" in capsys.readouterr().out


def test_a_flat_index_takes_new_rows_and_grows_into_ivfpq_past_its_threshold(tmp_path, capsys):
    from clipforge import cli

    vectors = clustered(700, 32, seed=5)
    folder = tmp_path / "emb"
    write_collection(folder, vectors[:300], 150)

    def build():
        capsys.readouterr()
        assert cli.main(["index", "build", str(folder), "--quiet", "--exact-below", "600"]) == 0
        return capsys.readouterr().out

    def append(shard, first, last):
        ids = range(first, last)
        write_image_shard(folder, shard, vectors[first:last], {"path": [f"img/{i}.jpg" for i in ids],
                                                               "caption": [""] * len(ids), "width": [0] * len(ids),
                                                               "height": [0] * len(ids)})

    assert "built flat index of 300" in build()
    append(2, 300, 450)
    assert "added 150 vectors to the flat index of 300 (now 450, recall@10 1.000)" in build()
    index, info = load_index(folder)
    np.testing.assert_allclose(index.search(vectors[:5], 3)[0],
                               np.sort(vectors[:5] @ vectors[:450].T, axis=1)[:, ::-1][:, :3], atol=2e-3)
    assert info["count"] == 450 and index.ntotal == 450
    append(3, 450, 700)  # past --exact-below: what a rebuild would choose now is IVF-PQ
    assert "built ivfpq index of 700" in build()


def test_where_more_lists_stop_helping_the_tuning_reranks_deeper_instead():
    """Coarse codes (here 1 byte for 64 dimensions; an adopted autofaiss index's may be coarse) rank the true
    neighbours below a 16 x k shortlist however many lists are scanned: the tuning then re-ranks deeper at the
    lists it reached rather than scanning them all, and meets the target there."""
    import faiss

    from clipforge.retrieval.index import ArrayVectors, Reranked, tune_index

    vectors = clustered(8_000, 64, seed=3, clusters=8)
    index = faiss.index_factory(64, "IVF32,PQ2x4", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    info = tune_index(Reranked(index, ArrayVectors(vectors)), ArrayVectors(vectors),
                      {"kind": "ivfpq", "nlist": 32, "param": "nprobe,k_factor"}, target_recall=0.95)
    assert info["target_met"] and info["nprobe"] < 32 and info["k_factor"] > 16, info
